"""The `triton` lookup kernels: interpreted on the CPU, compiled for Hopper on the CPU, and run
through `embedding_bag` on a GPU.

- Interpreter tests run the kernels' real launches (`pallas_kernels.gpu.ops`: sort, grid, blocks,
  constexprs) under Triton's interpreter on torch CPU tensors, against a float64 numpy reference.
  The interpreter replaces Triton's compiler for the whole process and must be chosen before
  `triton` is first imported, so this module turns it on at import where no GPU is visible.
- The Hopper test compiles the kernels for sm_90 in a subprocess (Triton's compiler and ptxas run
  without a GPU) and reads the PTX and the resource usage: 16-byte loads, no spills.
- GPU tests (marked `gpu`) compare `embedding_bag(impl="triton")` with the `xla` impl; they skip
  where JAX sees no GPU or jax-triton is missing.
"""

import functools
import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _gpu_visible() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


GPU_VISIBLE = _gpu_visible()
if not GPU_VISIBLE and "triton" not in sys.modules:
  os.environ.setdefault("TRITON_INTERPRET", "1")

HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_TORCH = importlib.util.find_spec("torch") is not None

from memjax.ops import embedding_bag, resolve_impl, unavailable_reason  # noqa: E402
from pallas_kernels import gpu  # noqa: E402
from pallas_kernels.impls import Unavailable, bag_backward_xla, bag_forward_xla  # noqa: E402
from support import lookup  # noqa: E402
from support.lookup import assert_close, reference, term_scales  # noqa: E402

if HAVE_TRITON:
  from triton.runtime.interpreter import InterpretedFunction

  from pallas_kernels.gpu import kernels, ops

  INTERPRETING = isinstance(kernels.bag_forward_kernel, InterpretedFunction)
else:
  INTERPRETING = False

needs_interpreter = pytest.mark.skipif(
    not (INTERPRETING and HAVE_TORCH),
    reason="needs triton and torch, with Triton's interpreter on (no GPU visible, and triton not "
    "imported before this module)",
)
GPU_REASON = unavailable_reason("triton")
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"triton impl unavailable: {GPU_REASON}")


def random_case(seed, **shape):
  """A lookup case with signed weights (see `support.lookup.random_case`)."""
  return lookup.random_case(seed, **shape, signed=True)


# --- Triton's interpreter, on torch CPU tensors -------------------------------------------------

_TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "int32": "int32"}


def _to_torch(array):
  import torch

  array = np.asarray(array)
  if array.dtype == jnp.bfloat16:  # numpy has no bfloat16: move the bits
    return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(array.copy())


def _to_numpy(tensor):
  import torch

  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
  return tensor.numpy()


def run_interpreted(launch):
  """Runs an `ops.Launch` under the interpreter; outputs start as NaN, so a missed write shows."""
  import torch

  outs = [
      torch.full(s.shape, float("nan"), dtype=getattr(torch, _TORCH_DTYPES[jnp.dtype(s.dtype).name]))
      for s in launch.out_shapes
  ]
  launch.kernel[launch.grid](*map(_to_torch, launch.operands), *outs, **launch.constexprs)
  return [_to_numpy(o) for o in outs]


def interpreted_bag(values, idx, w, dout, forward_blocks=None, backward_blocks=None):
  (out,) = run_interpreted(ops.forward_launch(values, idx, w, **(forward_blocks or {})))
  dvalues, dw_partials = run_interpreted(
      ops.backward_launch(values, idx, w, dout, **(backward_blocks or {}))
  )
  return out, dvalues, np.asarray(ops.weight_gradient(jnp.asarray(dw_partials), idx.shape))


# Outputs are rounded once to their dtype; the interpreter stores bfloat16 by truncating (the GPU
# rounds to nearest): one bfloat16 step.
_ROUNDING_REL = {"float32": 1e-5, "float16": 2**-10, "bfloat16": 2**-7}

CASES = {
    # name: (random_case arguments, forward blocks, backward blocks)
    "odd_dim_and_bag": (dict(slots=300, dim=100, tokens=7, bag=70), None, None),
    "paper_row_bf16": (dict(slots=64, dim=1024, tokens=3, bag=128, dtype=jnp.bfloat16), None, None),
    "hot_rows_column_blocks": (
        dict(slots=50, dim=48, tokens=9, bag=33, dup_pool=3),
        dict(block_k=8, block_v=16),
        dict(block_r=4, block_j=4, block_v=16),
    ),
    "rows_in_order": (dict(slots=30, dim=20, tokens=4, bag=9), None, dict(heavy_rows_first=False)),
    "dim_one_float16": (dict(slots=37, dim=1, tokens=5, bag=6, dtype=jnp.float16), None, None),
    "bf16_weights_and_output": (
        dict(slots=70, dim=40, tokens=5, bag=24, dtype=jnp.bfloat16, w_dtype=jnp.bfloat16), None, None),
    "out_of_range_bf16": (
        dict(slots=40, dim=24, tokens=6, bag=16, dtype=jnp.bfloat16, out_of_range=True),
        dict(block_k=4),
        dict(block_r=16, block_j=2, block_v=8),
    ),
}


@needs_interpreter
@pytest.mark.parametrize("case", sorted(CASES))
def test_interpreted_kernels_match_float64_reference(case):
  shape, forward_blocks, backward_blocks = CASES[case]
  values, idx, w, dout = random_case(sum(map(ord, case)), **shape)
  out, dvalues, dw = interpreted_bag(values, idx, w, dout, forward_blocks, backward_blocks)
  want_out, want_dvalues, want_dw = reference(values, idx, w, dout)
  scale_out, scale_dvalues, scale_dw = term_scales(values, idx, w, dout)
  assert out.dtype == w.dtype and dvalues.dtype == values.dtype and dw.dtype == np.float32
  assert_close(out, want_out, _ROUNDING_REL[w.dtype.name], scale_out)
  assert_close(dvalues, want_dvalues, _ROUNDING_REL[values.dtype.name], scale_dvalues)
  assert_close(dw, want_dw, 1e-5, scale_dw)
  # Rows nobody read (or read only through out-of-range ids) are written, as exact zeros.
  read = np.zeros(values.shape[0], bool)
  idx_np = np.asarray(idx)
  read[idx_np[(idx_np >= 0) & (idx_np < values.shape[0])]] = True
  assert not np.asarray(dvalues, np.float64)[~read].any()


@needs_interpreter
def test_interpreted_kernels_match_the_xla_impl_to_float32_rounding():
  # Both sum float32 terms, in other orders: a few ulps of the terms' magnitude.
  values, idx, w, dout = random_case(5, slots=20, dim=40, tokens=8, bag=12, dup_pool=6)
  _, dvalues, dw = interpreted_bag(values, idx, w, dout)
  want_dvalues, want_dw = bag_backward_xla(values, idx, w, dout)
  _, scale_dvalues, scale_dw = term_scales(values, idx, w, dout)
  assert_close(dvalues, np.asarray(want_dvalues, np.float64), 1e-6, scale_dvalues)
  assert_close(dw, np.asarray(want_dw, np.float64), 1e-6, scale_dw)
  out, _, _ = interpreted_bag(values, idx, w, dout)
  assert_close(out, np.asarray(bag_forward_xla(values, idx, w), np.float64), 1e-6,
               term_scales(values, idx, w, dout)[0])


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_sorted_lookups_are_stable_and_rows_start_where_they_should():
  idx = jnp.array([[3, 0, 3], [5, 3, -1]], jnp.int32)
  w = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
  w_L, order_L, starts_S1, rows_S = ops.sort_lookups(5, idx, w)
  # Row 0 holds lookup 1 and the out-of-range -1 (lookup 5, weight 0); row 4 the clamped 5.
  np.testing.assert_array_equal(order_L, [1, 5, 0, 2, 4, 3])
  np.testing.assert_array_equal(starts_S1, [0, 2, 2, 2, 5, 6])
  np.testing.assert_array_equal(w_L, [1.0, 2.0, 3.0, 0.0, 5.0, 0.0])
  # Most-read rows first (3 lookups, 2, 1), ties in row order.
  np.testing.assert_array_equal(rows_S, [3, 0, 4, 1, 2])
  np.testing.assert_array_equal(ops.sort_lookups(5, idx, w, heavy_rows_first=False)[3], np.arange(5))


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_block_sizes_are_checked_and_defaults_fit_the_shape():
  values, idx, w, dout = random_case(0, slots=10, dim=100, tokens=3, bag=5)
  with pytest.raises(ValueError, match="block_v must be a positive power of two, got 48"):
    ops.forward_launch(values, idx, w, block_v=48)
  with pytest.raises(ValueError, match="block_j must be a positive power of two, got 0"):
    ops.backward_launch(values, idx, w, dout, block_j=0)
  forward = ops.forward_launch(values, idx, w)
  assert forward.grid == (3, 1) and forward.constexprs["BLOCK_V"] == 128
  # 32768 tokens: a 1024-wide float32 dOut slab would be 128 MB; 128 columns keep it in L2, or
  # 256 of a bfloat16 dOut.
  for dtype, block_v in ((jnp.float32, 128), (jnp.bfloat16, 256)):
    partials = jax.eval_shape(
        lambda v, i, w, d: ops.backward_launch(v, i, w, d).out_shapes[1],
        jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16),
        jax.ShapeDtypeStruct((32768, 4), jnp.int32),
        jax.ShapeDtypeStruct((32768, 4), dtype),
        jax.ShapeDtypeStruct((32768, 1024), dtype),
    )
    assert partials.shape == (1024 // block_v, 32768 * 4)


_HOPPER_SCRIPT = textwrap.dedent("""
    import json, pathlib, re, subprocess, sys, tempfile
    import jax.numpy as jnp, numpy as np
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pallas_kernels.gpu import ops

    TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32"}
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

    def compile_report(launch, **constexprs):
      fn = launch.kernel
      dtypes = [a.dtype for a in launch.operands] + [s.dtype for s in launch.out_shapes]
      signature = {name: "*" + TYPES[jnp.dtype(d).name] for name, d in zip(fn.arg_names, dtypes)}
      constexprs = dict(launch.constexprs, **constexprs)
      signature.update({name: "constexpr" for name in constexprs})
      # jax-triton promises 16-byte aligned buffers, as here.
      attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(dtypes))}
      compiled = triton.compile(
          ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
          options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
      with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"]); f.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
      ptx = compiled.asm["ptx"]
      return dict(
          v4_loads=len(re.findall(r"ld\\.global(?:\\.[\\w:]+)*\\.v4", ptx)),
          registers=int(re.search(r"REG:(\\d+)", usage).group(1)),
          local_bytes=int(re.search(r"LOCAL:(\\d+)", usage).group(1)),
          stack_bytes=int(re.search(r"STACK:(\\d+)", usage).group(1)))

    # The paper's shapes: a 1024^2 x 1024 table, 4096 x 8 tokens, bag 128 (the constexprs; the
    # arrays here are small stand-ins of the same dtypes).
    paper = dict(N_SLOTS=2**20, DIM=1024, BAG=128)
    report = {}
    for dtype in ("bfloat16", "float32"):
      values = jnp.zeros((16, 1024), dtype)
      idx = jnp.zeros((8, 128), jnp.int32); w = jnp.zeros((8, 128), jnp.float32)
      dout = jnp.zeros((8, 1024), jnp.float32)
      report["forward_" + dtype] = compile_report(ops.forward_launch(values, idx, w), **paper)
      backward = ops.backward_launch(values, idx, w, dout, block_v=256)
      report["backward_" + dtype] = compile_report(backward, N_LOOKUPS=32768 * 128, **paper)
    print(json.dumps(report))
""")


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton")
def test_kernels_compile_for_hopper_with_wide_loads_and_no_spills():
  env = dict(os.environ, TRITON_INTERPRET="0", JAX_PLATFORMS="cpu", TRITON_DEFAULT_FP_FUSION="1")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _HOPPER_SCRIPT], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json

  report = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, kernel in report.items():
    assert kernel["local_bytes"] == 0 and kernel["stack_bytes"] == 0, (name, kernel)
    assert kernel["registers"] <= 128, (name, kernel)  # several programs per multiprocessor
  # A 1024-wide tile of 8 rows over 128 threads: 16-byte loads, 8 per thread for bfloat16.
  assert report["forward_bfloat16"]["v4_loads"] >= 8, report
  assert report["forward_float32"]["v4_loads"] >= 16, report
  # The backward's (8 lookups x 256 columns) float32 dOut tile: 4 16-byte loads per thread.
  assert report["backward_bfloat16"]["v4_loads"] >= 4, report


_LOWER_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from pallas_kernels.gpu import ops

    S, V, N, K = 4096, 1000, 64, 128
    table = jax.ShapeDtypeStruct((S, V), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((N, K), jnp.int32)
    w = jax.ShapeDtypeStruct((N, K), jnp.bfloat16)
    dout = jax.ShapeDtypeStruct((N, V), jnp.bfloat16)

    def forward(v, i, w):
      return ops.run(ops.forward_launch(v, i, w), compute_capability=90)

    def backward(v, i, w, d):
      dvalues, dw = ops.run(ops.backward_launch(v, i, w, d), compute_capability=90)
      return dvalues, ops.weight_gradient(dw, i.shape)

    for fn, args in ((forward, (table, ids, w)), (backward, (table, ids, w, dout))):
      text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
      print(fn.__name__, text.count("@triton_kernel_call"))
""")


@pytest.mark.skipif(
    importlib.util.find_spec("jax_triton") is None or importlib.util.find_spec("jax_plugins") is None,
    reason="needs jax-triton and a CUDA plugin of jax (the gpu extra)",
)
def test_jax_triton_lowers_both_kernels_for_hopper_without_a_gpu():
  # jax-triton compiles each launch for sm_90 and emits its custom call: the operands, outputs
  # and constexprs of `ops` agree with jax-triton's call, checked where the gpu extra is installed.
  env = dict(os.environ, TRITON_INTERPRET="0", JAX_PLATFORMS="cpu", TRITON_DEFAULT_FP_FUSION="1")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _LOWER_SCRIPT], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["forward", "1", "backward", "1"], proc.stdout


# --- Dispatch where no GPU is visible -----------------------------------------------------------


@pytest.mark.skipif(GPU_VISIBLE, reason="checks the behaviour without a GPU")
def test_without_a_gpu_auto_stays_silent_and_triton_says_why():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert resolve_impl("auto") in ("cpu", "xla")
  assert unavailable_reason("triton") is not None
  with pytest.raises(Unavailable, match="no GPU visible to JAX"):
    gpu.load()
  values, idx, w, _ = random_case(0, slots=10, dim=4, tokens=2, bag=3)
  with pytest.raises(ValueError, match="impl 'triton' is not available: no GPU visible to JAX"):
    embedding_bag(values, idx, w, impl="triton")


# --- On a GPU, through embedding_bag ------------------------------------------------------------

GPU_CASES = {
    "odd_dim_and_bag": dict(slots=300, dim=100, tokens=37, bag=70),
    "paper_row_bf16": dict(slots=4096, dim=1024, tokens=256, bag=128, dtype=jnp.bfloat16,
                           w_dtype=jnp.bfloat16),
    "hot_rows": dict(slots=1000, dim=256, tokens=512, bag=64, dup_pool=5),
    "out_of_range_f32": dict(slots=64, dim=24, tokens=33, bag=16, out_of_range=True),
    "wide_rows_f16": dict(slots=512, dim=2048 + 8, tokens=40, bag=32, dtype=jnp.float16),
    "many_tokens_column_blocks": dict(slots=20000, dim=512, tokens=16384, bag=16),
}


def _bag_and_grads(impl, values, idx, w, dout):
  loss = lambda v, w: jnp.sum(embedding_bag(v, idx, w, impl=impl) * dout)
  out = jax.jit(functools.partial(embedding_bag, impl=impl))(values, idx, w)
  dvalues, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(values, w)
  return out, dvalues, dw


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gpu_triton_matches_xla(case):
  values, idx, w, dout = random_case(sum(map(ord, case)), **GPU_CASES[case])
  got = _bag_and_grads("triton", values, idx, w, dout)
  want = _bag_and_grads("xla", values, idx, w, dout)
  scales = term_scales(values, idx, w, dout)
  # Both sides round to the output dtype: at most one step apart.
  rels = tuple(_ROUNDING_REL[x.dtype.name] + 1e-5 for x in (w, values, w))
  for name, g, x, rel, scale in zip(("out", "dvalues", "dw"), got, want, rels, scales):
    assert g.dtype == x.dtype, name
    assert_close(g, np.asarray(x, np.float64), rel, scale)


@pytest.mark.gpu
@needs_gpu
def test_gpu_backward_is_deterministic_and_auto_picks_triton():
  assert resolve_impl("auto") == "triton"
  values, idx, w, dout = random_case(1, slots=64, dim=512, tokens=4096, bag=32, dup_pool=40)
  first = _bag_and_grads("triton", values, idx, w, dout)
  second = _bag_and_grads("triton", values, idx, w, dout)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.gpu
@needs_gpu
def test_gpu_vmap_empty_bags_and_no_tokens():
  values, idx, w, _ = random_case(2, slots=50, dim=8, tokens=6, bag=5)
  bag = functools.partial(embedding_bag, impl="triton")
  batched = jax.vmap(bag, in_axes=(None, 0, 0))(values, jnp.stack([idx, idx[::-1]]), jnp.stack([w, w]))
  np.testing.assert_allclose(batched[1], bag_forward_xla(values, idx[::-1], w), rtol=1e-5, atol=1e-5)
  per_table = jax.vmap(bag, in_axes=(0, None, None))(jnp.stack([values, 2 * values]), idx, w)
  np.testing.assert_allclose(per_table[1], 2 * bag_forward_xla(values, idx, w), rtol=1e-5, atol=1e-5)
  for shape in ((3, 0), (0, 5)):
    idx0, w0 = jnp.zeros(shape, jnp.int32), jnp.ones(shape)
    assert not np.asarray(bag(values, idx0, w0)).any()
    assert not np.asarray(jax.grad(lambda v: jnp.sum(bag(v, idx0, w0)))(values)).any()


# --- The device script, proven on the CPU -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TORCH, reason="needs torch")
def test_gpu_check_dry_run_writes_every_phase(tmp_path):
  # The device call has one try: every phase of benchmarks/gpu_check.py runs here at small shapes,
  # with the auto impl standing in for triton and torch on the CPU.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("TRITON_INTERPRET", None)
  proc = subprocess.run(
      [sys.executable, os.path.join(root, "benchmarks", "gpu_check.py"), "--dry-run", "--reps", "2",
       "--out", str(tmp_path)],
      cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  import json

  report = json.loads((tmp_path / "gpu_check.json").read_text())
  assert report["copy"]["GBps"] > 0
  assert [c["ok"] for c in report["checks"]] == [True, True]
  impls = report["bandwidth"]["impls"]
  kernel = report["environment"]["kernel_impl"]
  for name in (kernel, "xla", "torch_embedding_bag"):
    assert impls[name]["fwd_s"] > 0 and impls[name]["bwd_s"] > 0, (name, impls[name])
    assert 0 < impls[name]["fwd_unique_GBps"] <= impls[name]["fwd_per_lookup_GBps"]
  assert set(report["bandwidth"]["verdict"]) >= {"fwd_beats_baselines", "bwd_unique_meets_40%_of_copy"}
  # The reference's kernel is timed only from its git-ignored copy (never part of memjax).
  reference = impls["reference_triton"]
  if os.path.exists(os.path.join(root, ".device", "reference", "xformer_embeddingbag.py")):
    assert max(reference[f"{name}_rel_err"] for name in ("out", "dvalues", "dw")) < 2**-6, reference
  else:
    assert "is absent" in reference["skipped"], reference
  variants = report["bandwidth"]["variants_s"]  # built and checked here; timed on a GPU
  assert len(variants) == 23 and variants.pop("bwd sort_lookups only") > 0, variants
  step = report["train_step"]["impls"][kernel]
  assert step["step_s"] > 0 and np.isfinite(step["loss"])
  assert "| impl | fwd ms |" in proc.stdout


@pytest.mark.gpu
@needs_gpu
def test_gpu_inside_shard_map_matches_outside():
  # The memory-parallel layer calls the bag inside shard_map; one GPU makes a mesh of one.
  values, idx, w, dout = random_case(3, slots=64, dim=40, tokens=16, bag=12, dup_pool=20)
  loss = lambda v, idx, w, d: jnp.sum(embedding_bag(v, idx, w, impl="triton") * d)
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  P = jax.sharding.PartitionSpec
  specs = (P(), P("data"), P("data"), P("data"))
  args = [jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
          for x, spec in zip((values, idx, w, dout), specs)]
  grads = jax.jit(jax.shard_map(
      jax.grad(loss, argnums=(0, 2)), mesh=mesh, in_specs=specs, out_specs=(P(), P("data")),
  ))(*args)
  want = jax.grad(loss, argnums=(0, 2))(values, idx, w, dout)
  for got, expected in zip(grads, want):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
