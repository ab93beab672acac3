"""pallas_kernels.tpu: the `pallas_tpu` lookup equals the `xla` one in interpret mode on CPU, and
its kernels compile through libtpu (Mosaic) for v5e, v5p and v6e at the paper's per-device shapes.
"""

import functools
import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from memjax import aot
from memjax.ops import embedding_bag
from memjax.ops.memory_parallel import sharded_embedding_bag
from pallas_kernels.tpu import embedding_bag as kernels
from support.lookup import AXES, assert_close, explicit_mesh, placed, random_case, term_scales
from support.tpu import compile_for_chip, needs_libtpu


def case(seed, slots, dim, tokens, bag, dup_pool=None, dtype=jnp.float32):
  return random_case(seed, slots, dim, tokens, bag, dup_pool, dtype, signed=True, edge_rows=True)


def lookup_and_grads(impl, values, idx, w, cot):
  loss = lambda v, w: jnp.sum(embedding_bag(v, idx, w, impl=impl) * cot)
  out = jax.jit(functools.partial(embedding_bag, impl=impl))(values, idx, w)
  return (out, *jax.jit(jax.grad(loss, argnums=(0, 1)))(values, w))


@st.composite
def shapes(draw):
  """Rows 8..2^16, dims 128..1024, tokens 1..512, bag 1..256, drawn small-first (interpret mode
  runs every row copy as an XLA op), the table kept under 16 MiB."""
  dim = draw(st.sampled_from([128, 256, 1024]))
  slots = draw(st.one_of(st.integers(8, 600), st.sampled_from([2**12 + 1, 2**16])))
  hypothesis.assume(slots * dim <= 2**22)
  tokens = draw(st.one_of(st.integers(1, 40), st.integers(41, 512)))
  bag = draw(st.one_of(st.integers(1, 24), st.integers(25, 256)))
  hypothesis.assume(tokens * bag <= 2**12)
  return slots, dim, tokens, bag


@hypothesis.settings(max_examples=3, deadline=None, derandomize=True,
                     suppress_health_check=[hypothesis.HealthCheck.filter_too_much])
@hypothesis.given(
    shape=shapes(),
    seed=st.integers(0, 2**16),
    dup_pool=st.sampled_from([None, 1, 3]),  # 1 and 3: every bag repeats one to three rows
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
)
@hypothesis.example(shape=(2**16, 128, 512, 8), seed=1, dup_pool=None, dtype=jnp.bfloat16)
@hypothesis.example(shape=(8, 1024, 2, 256), seed=2, dup_pool=3, dtype=jnp.float32)
def test_lookup_and_gradients_equal_the_xla_impl(shape, seed, dup_pool, dtype):
  values, idx, w, cot = case(seed, *shape, dup_pool=dup_pool, dtype=dtype)
  got = lookup_and_grads("pallas_tpu", values, idx, w, cot)
  want = lookup_and_grads("xla", values, idx, w, cot)
  assert got[1].dtype == dtype  # the table gradient in the table's dtype
  # float32: both sum in float32 in other orders. bfloat16: the rows enter exactly, but each
  # impl rounds its table gradient to bfloat16 once.
  rels = (1e-6, 1e-6 if dtype == jnp.float32 else 2**-8, 1e-6)
  for g, w_, rel, scale in zip(got, want, rels, term_scales(values, idx, w, cot)):
    assert_close(g, w_, rel, scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_under_the_tpu_interpreter(dtype):
  """Pallas's TPU interpreter simulates the DMAs and semaphores, fills fresh VMEM with NaNs and
  raises on reads outside a buffer: the padding is zeroed and every copy stays in bounds."""
  values, idx, w, cot = case(3, 301, 256, 11, 5, dup_pool=4, dtype=dtype)
  idx = idx.at[0, 2].set(-4).at[1, 3].set(301)  # out of range: the edge rows, no table gradient
  params = pltpu.InterpretParams(random_seed=0)
  out = kernels.gather_bag(values, idx, w, block_tokens=8, interpret=params)
  dw = kernels.gather_dot(values, idx, cot, block_tokens=8, interpret=params)
  dvalues = kernels.table_grad(idx, w, cot, 301, dtype, block_rows=32, interpret=params)
  want = lookup_and_grads("xla", values, idx, w, cot)
  scales = term_scales(values, jnp.clip(idx, 0, 300), w, cot)
  assert_close(out, want[0], 1e-6, scales[0])
  assert_close(dvalues, want[1], 1e-6 if dtype == jnp.float32 else 2**-8, scales[1])
  assert_close(dw, want[2], 1e-6, scales[2])


def test_table_gradient_is_the_same_in_any_block_order():
  """No atomics: the interpreter visits the parallel grid in a random order per seed; the
  gradient is bit for bit the same."""
  values, idx, w, cot = case(4, 200, 128, 24, 8, dup_pool=5)
  grads = [
      np.asarray(kernels.table_grad(idx, w, cot, 200, jnp.float32, block_rows=16,
                                    interpret=pltpu.InterpretParams(random_seed=seed)))
      for seed in (0, 1)
  ]
  np.testing.assert_array_equal(grads[0], grads[1])
  assert not grads[0][np.setdiff1d(np.arange(200), np.asarray(idx))].any()  # unread rows zero


def test_the_sharded_lookup_on_eight_devices():
  # Off TPU, inside shard_map, the impl runs its XLA twin (see pallas_kernels/tpu/ops.py): this
  # checks the dispatch and the varying-axes types; `test_the_sharded_lookup_compiles_the_kernels`
  # checks that a TPU mesh gets the kernels.
  values, idx, w, cot = case(5, 300, 512, 64, 24, dup_pool=40)
  mesh = explicit_mesh((2, 1, 4))  # each device's column slice: 300 x 128
  bag = lambda v, i, w: sharded_embedding_bag(
      v, i, w, mesh=mesh, token_axes=AXES, memory_axis="memory", impl="pallas_tpu"
  )
  loss = lambda v, w, i, c: jnp.sum(bag(v, i, w) * c)
  v_p, i_p, w_p, c_p = placed(mesh, values, idx, w, cot)
  got = (jax.jit(bag)(v_p, i_p, w_p), *jax.jit(jax.grad(loss, argnums=(0, 1)))(v_p, w_p, i_p, c_p))
  want = lookup_and_grads("xla", values, idx, w, cot)
  for g, w_, scale in zip(got, want, term_scales(values, idx, w, cot)):
    assert_close(g, w_, 1e-6, scale)


def test_tunables_are_checked():
  values, idx, w, cot = case(6, 64, 256, 4, 3)
  with pytest.raises(ValueError, match="block_tokens must be a multiple of 8"):
    kernels.gather_bag(values, idx, w, block_tokens=12, interpret=True)
  with pytest.raises(ValueError, match="block_dim must divide"):
    kernels.gather_dot(values, idx, cot, block_dim=192, interpret=True)
  with pytest.raises(ValueError, match="tokens_in_flight must be a positive int"):
    kernels.gather_bag(values, idx, w, tokens_in_flight=0, interpret=True)
  with pytest.raises(ValueError, match="chunk must be a multiple of 128"):
    kernels.table_grad(idx, w, cot, 64, jnp.float32, chunk=100, interpret=True)
  with pytest.raises(TypeError, match="float32 or bfloat16"):
    kernels.gather_bag(values.astype(jnp.float16), idx, w, interpret=True)


# -- Real compiles through libtpu ---------------------------------------------------------------

# The paper's per-device shapes: the 373M model's table, and its column slice when 8 devices
# split it (memory parallelism); a batch of 8192 tokens, each reading 128 rows (4 heads x 32).
SLOTS, TOKENS, BAG = 2**20, 8192, 128
CHIPS = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


def hbm_mib(compiled):
  m = compiled.memory_analysis()
  return {k: round(getattr(m, f"{k}_size_in_bytes") / 2**20, 1)
          for k in ("argument", "output", "temp")}


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("chip", sorted(CHIPS))
def test_kernels_compile_for_tpus_at_the_paper_shapes(chip):
  chunk, block_rows = 128, 256
  entries = TOKENS * BAG
  # bfloat16 as the paper trains; float32 (single-row copies instead of row pairs) on the slice.
  for dim, dtype in ((1024, jnp.bfloat16), (128, jnp.bfloat16), (128, jnp.float32)):
    table, ids = ((SLOTS, dim), dtype), ((TOKENS, BAG), jnp.int32)
    weights, dout = ((TOKENS, BAG), jnp.float32), ((TOKENS, dim), jnp.float32)
    sorted_entries = [((entries // chunk, chunk), d) for d in (jnp.int32, jnp.int32, jnp.float32)]
    starts = ((SLOTS // block_rows + 1,), jnp.int32)
    forward = compile_for_chip(kernels.gather_bag, CHIPS[chip], table, ids, weights)
    backward = compile_for_chip(
        lambda v, i, d, r, t, w, s: (
            kernels.sorted_row_grad(r, t, w, s, d, SLOTS, dtype, block_rows=block_rows),
            kernels.gather_dot(v, i, d),
        ),
        CHIPS[chip], table, ids, dout, *sorted_entries, starts,
    )
    for name, compiled in (("forward", forward), ("backward", backward)):
      figures = hbm_mib(compiled)
      kind = f"{SLOTS}x{dim} {jnp.dtype(dtype).name}, {TOKENS}x{BAG}"
      print(f"{chip} {kind}: {name} HBM MiB {figures}")
      assert "tpu_custom_call" in compiled.as_text()  # Mosaic kernels, not an XLA fallback
      total_gib = sum(figures.values()) / 1024
      assert total_gib < aot.GENERATIONS[chip].hbm_gib
    # The kernels' own temporaries are VMEM, not HBM: the backward's HBM is its operands and the
    # (S, V) gradient in the table's dtype.
    assert hbm_mib(backward)["output"] >= SLOTS * dim * jnp.dtype(dtype).itemsize / 2**20


@needs_libtpu
def test_the_sharded_lookup_compiles_the_kernels_for_a_tpu_mesh():
  from jax.experimental import topologies

  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  mesh = explicit_mesh((1, 1, 4), devices)
  bag = lambda v, i, w: sharded_embedding_bag(
      v, i, w, mesh=mesh, token_axes=AXES, memory_axis="memory", impl="pallas_tpu"
  )
  loss = lambda v, w, i: jnp.sum(bag(v, i, w) ** 2)  # the backward needs the forward
  P, S = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
  args = (jax.ShapeDtypeStruct((4096, 512), jnp.bfloat16, sharding=S(mesh, P(None, "memory"))),
          jax.ShapeDtypeStruct((256, 32), jnp.float32, sharding=S(mesh, P(AXES))),
          jax.ShapeDtypeStruct((256, 32), jnp.int32, sharding=S(mesh, P(AXES))))
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
  # The forward, the table gradient and the weight gradient: three Mosaic kernels.
  assert len(set(re.findall(r"memjax_(gather_bag|gather_dot|sorted_row_grad)", hlo))) == 3


@needs_libtpu
def test_the_kernels_compile_for_the_papers_largest_table_on_a_v5p_128_slice():
  """8192^2 slots x 2048 in bfloat16 with memory=16: each chip holds a 128-column slice of every
  row and reads for its memory group's 16 x 4,096 tokens (a batch of 64 x 4,096 over 64 chips),
  4 heads x knn 32 each. The table gradient's SMEM holds one block of row bounds, not every
  block's start (262,145 of them would exceed SMEM's 1 MiB)."""
  slots, dim, tokens, bag, chunk, block_rows = 8192**2, 128, 16 * 4096, 128, 128, 256
  table, ids = ((slots, dim), jnp.bfloat16), ((tokens, bag), jnp.int32)
  weights, dout = ((tokens, bag), jnp.float32), ((tokens, dim), jnp.float32)
  sorted_entries = [((tokens * bag // chunk, chunk), d) for d in (jnp.int32, jnp.int32, jnp.float32)]
  forward = compile_for_chip(kernels.gather_bag, CHIPS["v5p"], table, ids, weights)
  backward = compile_for_chip(
      lambda v, i, d, r, t, w, s: (
          kernels.sorted_row_grad(r, t, w, s, d, slots, jnp.bfloat16, block_rows=block_rows),
          kernels.gather_dot(v, i, d),
      ),
      CHIPS["v5p"], table, ids, dout, *sorted_entries, ((slots // block_rows + 1,), jnp.int32),
  )
  for compiled in (forward, backward):
    assert "tpu_custom_call" in compiled.as_text()
  assert hbm_mib(backward)["output"] >= slots * dim * 2 / 2**20
