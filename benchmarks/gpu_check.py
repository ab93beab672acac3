"""One GPU's check of the `triton` lookup: correctness against `xla`, bandwidth, a train step.

  python benchmarks/gpu_check.py --out DIR [--dry-run] [--train-layers 12] [--skip-train]

Phases, each adding to DIR/gpu_check.json as it ends (a run cut short keeps what it measured):
1. environment: GPU, jax, jax-triton, triton and torch versions;
2. copy bandwidth: a device-to-device copy of a 2 GiB buffer through torch, counting bytes read
   plus bytes written: the ceiling the lookups are measured against;
3. correctness: the triton impl's forward, table gradient and weight gradient against the xla
   impl at several shapes, up to the paper's; errors relative to the summed terms' magnitude;
4. bandwidth at the paper's shapes (a 2^20 x 1024 bfloat16 table, 4096 x 8 tokens, bag 128, uniform
   random ids): forward and backward time of the triton impl (a few block-size variants; the
   defaults are what `embedding_bag` runs), the xla impl, torch's `F.embedding_bag` and the
   reference's own Triton kernel (below), each checked against xla once. Effective
   bandwidth counts unique bytes (distinct table rows read, ids, weights, outputs; the backward
   writes the whole dense table gradient) over time; `per_lookup` counts one row read per lookup
   instead, the traffic of a gather that no cache helps;
5. a train step of the 373m Memory+ shape (`configs/pkplus_373m_1024k.yaml`, fewer layers, batch
   8 x 1024) with each impl.

The reference's kernel (`lingua/product_key/xformer_embeddingbag.py` of facebookresearch/memory,
CC-BY-NC) is never part of memjax: fetch it into the git-ignored `.device/reference/` and it is
loaded from there (`--reference`); without it that row says it was skipped. Its forward is
`embedding_bag_triton` and its backward `embedding_bag_bw_rev_indices` (the reference model's
default, `bw_algo="reverse_indices"`), fed int64 ids as its model's `topk` gives them.

`--dry-run` runs every phase on the CPU at small shapes, with the `auto` impl (the C++ CPU kernels
here) standing in for triton, torch on the CPU, and the reference kernel under Triton's
interpreter, so the script itself is tested without a GPU.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# torch and JAX share the GPU: JAX takes memory as it needs it instead of 75 % up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from memjax.ops import embedding_bag, resolve_impl  # noqa: E402
from memjax.ops.dispatch import kernels  # noqa: E402

# Weights and output gradients in the model's compute dtype, as the 373m config's bag gets them.
PAPER = dict(slots=2**20, dim=1024, tokens=4096 * 8, bag=128, dtype="bfloat16", w_dtype="bfloat16")
# A power-of-two dim: the reference kernel loads whole rows with tl.arange(0, dim).
DRY = dict(slots=4096, dim=128, tokens=256, bag=16, dtype="bfloat16", w_dtype="bfloat16")
CHECKS = [
    dict(slots=1000, dim=100, tokens=333, bag=70, dtype="float32"),
    dict(slots=4096, dim=1024, tokens=512, bag=128, dtype="bfloat16"),
    dict(slots=65536, dim=2048 + 8, tokens=1024, bag=32, dtype="float16"),
    PAPER,
]
DRY_CHECKS = [dict(slots=300, dim=100, tokens=33, bag=70, dtype="float32"), DRY]
# Block-size variants timed beside the defaults ({}). At the paper's shape the forward's defaults
# are 1024 columns, 8 rows in flight and 4 warps; the backward's 256 columns (the dOut slab stays
# in L2), 1 warp (16 bytes of a row a thread) and 4 lookups at once (rows average 4). The
# whole-row, one-warp variants are the reference kernel's layout.
FWD_VARIANTS = [dict(), dict(block_k=16), dict(block_k=4), dict(num_warps=2),
                dict(block_v=512, num_warps=2), dict(block_v=256, num_warps=1),
                dict(block_v=1024, num_warps=1), dict(block_v=1024, num_warps=1, block_k=2)]
BWD_VARIANTS = [dict(), dict(num_warps=2), dict(num_warps=4), dict(block_v=128), dict(block_v=512),
                dict(block_v=512, num_warps=1), dict(block_v=1024, num_warps=1),
                dict(block_v=1024, num_warps=2), dict(block_j=2), dict(block_j=8),
                dict(block_r=4), dict(block_r=16), dict(heavy_rows_first=False),
                dict(heavy_rows_first=False, block_v=512, num_warps=1)]
REFERENCE = ROOT / ".device" / "reference" / "xformer_embeddingbag.py"
THRESHOLDS = {"fwd": 0.70, "bwd": 0.40}  # of the copy bandwidth: the GPU issue's targets


def block(x):
  if hasattr(x, "device") and "torch" in type(x).__module__:
    import torch

    if x.is_cuda:
      torch.cuda.synchronize()
    return x
  return jax.block_until_ready(x)


def attempt(fn, *args, **kwargs) -> dict:
  """fn's result, or its error: one broken part (say, jax-triton on this jax) must not cost the
  call the other figures."""
  try:
    return fn(*args, **kwargs)
  except Exception as error:  # noqa: BLE001
    return {"error": repr(error), "traceback": traceback.format_exc()[-3000:]}


def median_time(fn, reps: int, warmup: int = 2) -> float:
  """Median wall time of fn(), each call waited for (a few us of launch overhead on ms-long
  kernels; jax and torch use different streams, so device events would see only one)."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def make_case(seed, slots, dim, tokens, bag, dtype, w_dtype="float32"):
  key_v, key_i, key_w, key_d = jax.random.split(jax.random.PRNGKey(seed), 4)
  values = jax.random.normal(key_v, (slots, dim), jnp.float32).astype(dtype)
  idx = jax.random.randint(key_i, (tokens, bag), 0, slots, jnp.int32)
  w = jax.random.uniform(key_w, (tokens, bag), jnp.float32).astype(w_dtype)
  dout = jax.random.normal(key_d, (tokens, dim), jnp.float32).astype(w_dtype)
  return values, idx, w, dout


def environment(kernel_impl: str) -> dict:
  env = dict(jax=jax.__version__, backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
             kernel_impl=kernel_impl)
  for module in ("triton", "jax_triton", "torch"):
    try:
      env[module] = __import__(module).__version__
    except Exception as error:  # noqa: BLE001  (recorded, not fatal)
      env[module] = f"unavailable: {error!r}"
  try:
    import torch

    if torch.cuda.is_available():
      env["gpu"] = torch.cuda.get_device_name(0)
  except ImportError:
    pass
  return env


def copy_bandwidth(n_bytes: int, reps: int) -> dict:
  import torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  src = torch.randn(n_bytes // 4, device=device)
  dst = torch.empty_like(src)
  seconds = median_time(lambda: dst.copy_(src), reps)
  del src, dst
  if device == "cuda":
    torch.cuda.empty_cache()
  return dict(device=device, bytes=n_bytes, seconds=seconds, GBps=2 * n_bytes / seconds / 1e9)


@functools.partial(jax.jit, static_argnums=0)
def bag_and_grads(impl: str, values, idx, w, dout):
  """(out, dvalues, dw) of impl's embedding bag."""
  out, vjp = jax.vjp(lambda v, w: embedding_bag(v, idx, w, impl=impl), values, w)
  return (out, *vjp(dout))


def relative_errors(got, values, idx, w, dout) -> dict:
  """Max error of each of got = (out, dvalues, dw) against xla, relative to the magnitude of the
  summed terms (xla's results on absolute values); and whether each is finite."""
  want = bag_and_grads("xla", values, idx, w, dout)
  scales = bag_and_grads("xla", jnp.abs(values), idx, jnp.abs(w), jnp.abs(dout))
  errors = {}
  for name, g, x, s in zip(("out", "dvalues", "dw"), got, want, scales):
    diff = jnp.abs(g.astype(jnp.float32) - x.astype(jnp.float32))
    errors[name] = float(jnp.max(diff / (s.astype(jnp.float32) + 1e-30)))
    errors[name + "_finite"] = bool(jnp.all(jnp.isfinite(g)))
  return errors


def check(impl: str, shape: dict, seed: int) -> dict:
  """Max error of impl against xla, relative to the magnitude of the summed terms."""
  values, idx, w, dout = make_case(seed, **shape)
  errors = relative_errors(bag_and_grads(impl, values, idx, w, dout), values, idx, w, dout)
  # Both sides round to the output dtype once: at most one step apart.
  rounding = {"float32": 1e-5, "float16": 2**-10, "bfloat16": 2**-7}
  table_rel = rounding[shape["dtype"]] + 1e-5
  w_rel = rounding[shape.get("w_dtype", "float32")] + 1e-5
  errors["ok"] = bool(errors["out"] <= w_rel and errors["dvalues"] <= table_rel and errors["dw"] <= w_rel
                      and all(errors[k + "_finite"] for k in ("out", "dvalues", "dw")))
  return dict(shape, **errors)


def traffic(values, idx, w) -> dict:
  """Bytes each pass must move: unique (each distinct row once) and per lookup."""
  slots, dim = values.shape
  item, w_item = values.dtype.itemsize, w.dtype.itemsize
  unique_rows = int(jnp.sum(jnp.zeros(slots, jnp.int32).at[idx.reshape(-1)].max(1)))
  ids_weights = idx.size * (4 + w_item)
  out = idx.shape[0] * dim * w_item  # the output, and dOut, in the weights' dtype
  return dict(
      unique_rows=unique_rows,
      fwd_unique=unique_rows * dim * item + ids_weights + out,
      fwd_per_lookup=idx.size * dim * item + ids_weights + out,
      # Read: touched rows, dOut, ids, weights. Write: the dense table gradient, dw.
      bwd_unique=unique_rows * dim * item + out + ids_weights + slots * dim * item + idx.size * w_item,
      bwd_per_lookup=(idx.size * dim * (item + w_item) + ids_weights + slots * dim * item
                      + idx.size * w_item),
  )


def jax_pass_times(forward, backward, values, idx, w, dout, reps) -> dict:
  fwd = jax.jit(forward)
  bwd = jax.jit(backward)
  return dict(fwd_s=median_time(lambda: fwd(values, idx, w), reps),
              bwd_s=median_time(lambda: bwd(values, idx, w, dout), reps))


def to_torch(x: jax.Array, dtype):
  """x as a contiguous torch tensor of dtype, on the GPU without a host round trip."""
  import torch

  if torch.cuda.is_available():
    return torch.from_dlpack(jax.block_until_ready(x)).to(dtype).contiguous()
  if jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)  # numpy has no bfloat16
  return torch.from_numpy(np.asarray(x)).to(dtype).contiguous()


def free_torch_memory() -> None:
  import torch

  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def torch_pass_times(values, idx, w, dout, reps) -> dict:
  """F.embedding_bag: the forward, and the backward alone (autograd.grad on a kept graph)."""
  import torch
  import torch.nn.functional as F

  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = getattr(torch, str(values.dtype))
  table = to_torch(values, dtype).detach().requires_grad_(True)
  ids = to_torch(idx, torch.int64)
  # per_sample_weights must have the table's dtype.
  weights = to_torch(w, dtype).requires_grad_(True)
  grad_out = to_torch(dout, dtype)
  forward = lambda: F.embedding_bag(ids, table, per_sample_weights=weights, mode="sum")
  fwd_s = median_time(lambda: forward().detach(), reps)
  out = forward()
  result = dict(device=device, fwd_s=fwd_s)
  try:
    result["bwd_s"] = median_time(
        lambda: torch.autograd.grad(out, (table, weights), grad_out, retain_graph=True)[0], reps)
  except NotImplementedError as error:
    # CUDA torch has no bfloat16 per-sample-weight gradient: time the table gradient alone (a
    # lower bound on the whole backward), and say so.
    result["bwd_note"] = f"table gradient only: {error}"
    weights.requires_grad_(False)
    out = forward()
    result["bwd_s"] = median_time(
        lambda: torch.autograd.grad(out, table, grad_out, retain_graph=True)[0], reps)
  del table, weights, out
  free_torch_memory()
  return result


def load_reference(path: pathlib.Path):
  """The reference's kernel module, from its git-ignored copy."""
  spec = importlib.util.spec_from_file_location("reference_xformer_embeddingbag", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def reference_pass_times(path: pathlib.Path, values, idx, w, dout, reps, warmup=2) -> dict:
  """The reference's Triton forward and reverse-indices backward, timed as torch's row is, and
  their results against the xla impl (relative to the summed terms' magnitude, as `check`)."""
  import torch

  if not path.exists():
    return {"skipped": f"{path} is absent (fetch the reference's xformer_embeddingbag.py there)"}
  slots, dim = values.shape
  if dim & (dim - 1):
    return {"skipped": f"the reference kernel needs a power-of-two dim, got {dim}"}
  # jax-triton 0.3 empties TRITON_CACHE_DIR, where Triton's own launcher builds its helpers.
  if not os.environ.get("TRITON_CACHE_DIR"):
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-cache-")
  reference = load_reference(path)
  dtype = getattr(torch, str(values.dtype))
  table = to_torch(values, dtype)
  ids = to_torch(idx, torch.int64)  # as the reference model's topk returns them
  weights = to_torch(w, dtype)  # its scores are cast to the table's dtype (type_as)
  grad_out = to_torch(dout, dtype)
  last = {}  # the results of the last timed calls, checked below

  def forward():
    last["out"] = reference.embedding_bag_triton(ids, table, weights)
    return last["out"]

  def backward():
    last["dvalues"], last["dw"] = reference.embedding_bag_bw_rev_indices(ids, table, weights,
                                                                         grad_out)
    return last["dvalues"]

  fwd_s = median_time(forward, reps, warmup)
  bwd_s = median_time(backward, reps, warmup)
  got = [jnp.from_dlpack(last[name]) for name in ("out", "dvalues", "dw")]
  del table, ids, weights, grad_out
  free_torch_memory()

  # The reference's weights are in the table's dtype: xla gets the same.
  errors = relative_errors(got, values, idx, w.astype(values.dtype), dout)
  errors = {f"{name}_rel_err": errors[name] for name in ("out", "dvalues", "dw")}
  return dict(fwd_s=fwd_s, bwd_s=bwd_s, **errors)


def sweep(values, idx, w, dout, reps: int, run_kernels: bool) -> dict:
  """Times of the triton kernels at other block sizes, and of the backward's sort alone. Without
  a GPU (the dry run) every variant's launch is still built and checked, and the sort timed."""
  try:
    from pallas_kernels.gpu import ops
  except ImportError as error:
    return {"skipped": f"triton is not installed: {error}"}

  def forward(v, i, w, blocks):
    launch = ops.forward_launch(v, i, w, **blocks)
    return ops.run(launch)[0] if run_kernels else launch.operands

  def backward(v, i, w, d, blocks):
    launch = ops.backward_launch(v, i, w, d, **blocks)
    if not run_kernels:
      return launch.operands
    dvalues, dw = ops.run(launch)
    return dvalues, ops.weight_gradient(dw, i.shape)

  times = {}
  for name, fn, variants, operands in (("fwd", forward, FWD_VARIANTS, (values, idx, w)),
                                       ("bwd", backward, BWD_VARIANTS, (values, idx, w, dout))):
    for blocks in variants:
      jitted = jax.jit(functools.partial(fn, blocks=blocks))
      key = f"{name} {json.dumps(blocks)}"
      if run_kernels:
        times[key] = attempt(median_time, functools.partial(jitted, *operands), reps)
      else:
        jax.eval_shape(jitted, *operands)  # the blocks pass their checks
        times[key] = None
  # The backward's XLA part alone (sort by row, row starts): what the kernel's time sits on.
  sort = jax.jit(lambda i, w: ops.sort_lookups(values.shape[0], i, w))
  times["bwd sort_lookups only"] = median_time(functools.partial(sort, idx, w), reps)
  return times


def bandwidth(kernel_impl: str, shape: dict, copy_GBps: float, reps: int, run_kernels: bool,
              reference: pathlib.Path) -> dict:
  values, idx, w, dout = make_case(0, **shape)
  bytes_ = traffic(values, idx, w)
  rows = {}
  passes = lambda impl: (kernels(impl).bag_forward, kernels(impl).bag_backward)
  if kernel_impl is not None:
    rows[kernel_impl] = attempt(jax_pass_times, *passes(kernel_impl), values, idx, w, dout, reps)
  rows["xla"] = attempt(jax_pass_times, *passes("xla"), values, idx, w, dout, max(3, reps // 3))
  rows["torch_embedding_bag"] = attempt(torch_pass_times, values, idx, w, dout, reps)
  # Without a GPU the reference runs under Triton's interpreter, seconds a call: once, untimed.
  rows["reference_triton"] = attempt(reference_pass_times, reference, values, idx, w, dout,
                                     *((reps, 2) if run_kernels else (1, 0)))
  variants = attempt(sweep, values, idx, w, dout, reps, run_kernels=run_kernels)
  for row in rows.values():
    for p in ("fwd", "bwd"):
      if f"{p}_s" in row:
        row[f"{p}_unique_GBps"] = bytes_[f"{p}_unique"] / row[f"{p}_s"] / 1e9
        row[f"{p}_per_lookup_GBps"] = bytes_[f"{p}_per_lookup"] / row[f"{p}_s"] / 1e9
        row[f"{p}_unique_of_copy"] = row[f"{p}_unique_GBps"] / copy_GBps
        row[f"{p}_per_lookup_of_copy"] = row[f"{p}_per_lookup_GBps"] / copy_GBps
  kernel = rows.get(kernel_impl, {})
  verdict = {}
  for p, threshold in THRESHOLDS.items():
    if f"{p}_s" not in kernel:
      continue
    others = [r[f"{p}_s"] for name, r in rows.items() if name != kernel_impl and f"{p}_s" in r]
    verdict[f"{p}_unique_meets_{threshold:.0%}_of_copy"] = kernel[f"{p}_unique_of_copy"] >= threshold
    verdict[f"{p}_per_lookup_meets_{threshold:.0%}_of_copy"] = (
        kernel[f"{p}_per_lookup_of_copy"] >= threshold)
    verdict[f"{p}_beats_baselines"] = all(kernel[f"{p}_s"] < t for t in others)
    if f"{p}_s" in rows["reference_triton"]:
      verdict[f"{p}_beats_reference"] = kernel[f"{p}_s"] < rows["reference_triton"][f"{p}_s"]
  return dict(shape=shape, bytes=bytes_, impls=rows, variants_s=variants, verdict=verdict)


def train_step_times(impls, layers: int, dry: bool, reps: int) -> dict:
  # Three memory layers spread like the reference's blocks 4, 12 and 20 of 24.
  memory_layers = [layers - 1] if dry else sorted({round((2 * i + 1) * layers / 6) for i in range(3)})
  overrides = [f"model.n_layers={layers}", f"model.memory.layers=[{','.join(map(str, memory_layers))}]",
               "train.grad_accum=1"]  # one step of the batch below, not the recipe's micro-batches
  if dry:
    overrides += ["model.dim=64", "model.n_heads=2", "model.memory.n_keys=16", "model.memory.k_dim=32",
                  "model.memory.heads=2", "model.memory.knn=4", "train.batch_size=2", "train.seq_len=32"]
  else:
    overrides += ["train.batch_size=8", "train.seq_len=1024"]
  results = {impl: attempt(_train_step_time, impl, overrides, reps) for impl in impls}
  return dict(layers=layers, memory_layers=memory_layers, overrides=overrides, impls=results)


def _train_step_time(impl: str, overrides: list[str], reps: int) -> dict:
  """Median time of the jitted, donated train step (memjax.training.step.jit_train_step)."""
  from memjax import config_loading
  from memjax import sharding
  from memjax.training import state as state_lib
  from memjax.training import step as step_lib

  cfg = config_loading.load(ROOT / "configs" / "pkplus_373m_1024k.yaml",
                            [*overrides, f"model.memory.impl={impl}"])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  jitted, _ = step_lib.jit_train_step(cfg, mesh)
  state = state_lib.create_state(cfg, mesh)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (cfg.train.batch_size, cfg.train.seq_len + 1),
                              0, cfg.model.vocab_size, jnp.int32)
  tokens = jax.device_put(tokens, sharding.batch_sharding(mesh))
  start = time.perf_counter()
  state, metrics = jitted(state, tokens)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    state, metrics = jitted(state, tokens)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  result = dict(compile_and_first_step_s=first, step_s=step_s, loss=float(metrics["loss"]),
                tokens_per_s=cfg.train.batch_size * cfg.train.seq_len / step_s)
  del state, metrics, jitted
  gc.collect()
  return result


def print_table(report: dict) -> None:
  bw = report.get("bandwidth")
  copy = report.get("copy", {}).get("GBps", float("nan"))
  if bw:
    print(f"\nlookup at {bw['shape']}, copy bandwidth {copy:.0f} GB/s "
          f"({report['environment'].get('gpu', report['environment']['backend'])})")
    print("| impl | fwd ms | fwd GB/s unique (% copy) | fwd GB/s per lookup | bwd ms | "
          "bwd GB/s unique (% copy) | bwd GB/s per lookup |")
    print("|---|---|---|---|---|---|---|")
    for name, r in bw["impls"].items():
      if "fwd_s" not in r:
        print(f"| {name} | {str(r.get('skipped', r.get('error', r)))[:300]} |")
        continue
      print(f"| {name} | {r['fwd_s'] * 1e3:.3f} | {r['fwd_unique_GBps']:.0f} "
            f"({r['fwd_unique_of_copy']:.0%}) | {r['fwd_per_lookup_GBps']:.0f} | "
            f"{r['bwd_s'] * 1e3:.3f} | {r['bwd_unique_GBps']:.0f} ({r['bwd_unique_of_copy']:.0%}) | "
            f"{r['bwd_per_lookup_GBps']:.0f} |")
    for name, seconds in bw["variants_s"].items():
      shown = ("built, not run" if seconds is None else
               f"{seconds * 1e3:.3f} ms" if isinstance(seconds, float) else str(seconds)[:300])
      print(f"  variant {name}: {shown}")
    for name, r in bw["impls"].items():
      if "bwd_note" in r:
        print(f"{name} backward: {r['bwd_note'][:200]}")
    ref = bw["impls"].get("reference_triton", {})
    if "out_rel_err" in ref:
      print("reference kernel against xla (relative error): "
            + ", ".join(f"{k} {ref[k + '_rel_err']:.2e}" for k in ("out", "dvalues", "dw")))
    print("verdict:", json.dumps(bw["verdict"]))
  for c in report.get("checks", []):
    print("check", {k: c.get(k) for k in ("slots", "dim", "tokens", "bag", "dtype", "out", "dvalues", "dw",
                                          "ok", "error")})
  train = report.get("train_step")
  if train:
    for impl, r in train["impls"].items():
      if "step_s" not in r:
        print(f"train step, {impl}: {r.get('error')}")
        continue
      print(f"train step ({train['layers']} layers), {impl}: {r['step_s'] * 1e3:.1f} ms, "
            f"{r['tokens_per_s']:.0f} tokens/s, first step {r['compile_and_first_step_s']:.1f} s")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for gpu_check.json")
  parser.add_argument("--dry-run", action="store_true", help="CPU, small shapes, the auto impl")
  parser.add_argument("--train-layers", type=int, default=12)
  parser.add_argument("--skip-train", action="store_true")
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--reference", type=pathlib.Path, default=REFERENCE,
                      help="the reference's xformer_embeddingbag.py (git-ignored copy)")
  args = parser.parse_args()
  if args.dry_run:
    # The reference's kernels run under Triton's interpreter; the flag must be set before triton is
    # first imported (its own library functions are wrapped then).
    assert "triton" not in sys.modules
    os.environ["TRITON_INTERPRET"] = "1"
  args.out.mkdir(parents=True, exist_ok=True)
  path = args.out / "gpu_check.json"
  try:
    kernel_impl = resolve_impl("auto") if args.dry_run else resolve_impl("triton")
    error = None
  except ValueError as exc:  # still measure the baselines
    kernel_impl, error = None, str(exc)
  report = {"environment": dict(environment(kernel_impl), kernel_error=error)}

  def save(phase):
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"[{time.strftime('%H:%M:%S')}] {phase} done", flush=True)

  save("environment")
  report["copy"] = copy_bandwidth((64 << 20) if args.dry_run else (2 << 30), args.reps)
  save("copy bandwidth")
  report["checks"] = [{**shape, "ok": False, **(attempt(check, kernel_impl, shape, seed)
                                                   if kernel_impl else {"error": error})}
                      for seed, shape in enumerate(DRY_CHECKS if args.dry_run else CHECKS)]
  save("checks")
  report["bandwidth"] = bandwidth(kernel_impl, DRY if args.dry_run else PAPER, report["copy"]["GBps"],
                                  args.reps, run_kernels=kernel_impl == "triton",
                                  reference=args.reference)
  save("bandwidth")
  if not args.skip_train:
    # The dry run trains with the stand-in impl only: the xla step is the same code, compiled again.
    report["train_step"] = train_step_times(
        [kernel_impl] if args.dry_run else [i for i in (kernel_impl, "xla") if i],
        1 if args.dry_run else args.train_layers, args.dry_run, 3)
    save("train step")
  print_table(report)
  if not all(c["ok"] for c in report["checks"]):
    raise SystemExit("a correctness check failed or did not run; see gpu_check.json")


if __name__ == "__main__":
  main()
