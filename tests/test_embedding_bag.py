"""memjax.ops.embedding_bag, and row_dots on its kernels, against the materialised
gather-and-sum they replace, per impl."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lookup_impls import IMPLS
from memjax.ops import available_impls, embedding_bag, resolve_impl, row_dots
from pallas_kernels import cpu

pytestmark = pytest.mark.parametrize("impl", IMPLS)


def naive_bag(values_SV, idx_NK, w_NK):
  rows_NKV = values_SV[idx_NK].astype(jnp.float32)
  return jnp.einsum("nk,nkv->nv", w_NK.astype(jnp.float32), rows_NKV, precision="highest")


def random_case(seed, slots, dim, tokens, bag, dup_pool=None, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  pool = np.arange(slots) if dup_pool is None else rng.choice(slots, size=dup_pool)
  idx = rng.choice(pool, size=(tokens, bag)).astype(np.int32)
  values = jnp.asarray(rng.standard_normal((slots, dim)), dtype)
  weights = jnp.asarray(rng.random((tokens, bag)), jnp.float32)
  return values, jnp.asarray(idx), weights


# float32 sums in another order than the reference: a few ulps of the terms' magnitude (the
# result itself can be far smaller when signed terms cancel).
F32_REL = 1e-5


def close(actual, expected, rel, scale=None):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = max(np.abs(expected).max() if scale is None else scale, 1e-30)
  np.testing.assert_array_less(np.abs(actual - expected).max(), rel * scale + 1e-30)


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(
    seed=st.integers(0, 2**16),
    slots=st.integers(1, 300),
    dim=st.sampled_from([1, 3, 8, 32, 100]),
    tokens=st.integers(1, 40),
    bag=st.integers(1, 70),
    duplicated=st.booleans(),
)
# Signed terms cancelling to a tiny output (once a false failure of a result-relative tolerance).
@hypothesis.example(seed=48, slots=47, dim=1, tokens=1, bag=46, duplicated=False)
def test_forward_and_gradients_match_gather_and_sum(
    impl, seed, slots, dim, tokens, bag, duplicated
):
  values, idx, w = random_case(seed, slots, dim, tokens, bag, dup_pool=3 if duplicated else None)
  bag_op = functools.partial(embedding_bag, impl=impl)
  cot = jax.random.normal(jax.random.PRNGKey(seed), (tokens, dim))

  @jax.jit  # one program per example: eager, every op of each shape compiles on its own
  def compare(values, w):
    loss = lambda f: lambda v, w: jnp.sum(f(v, idx, w) * cot)
    abs_loss = lambda v, w: jnp.sum(naive_bag(jnp.abs(v), idx, w) * jnp.abs(cot))
    return (bag_op(values, idx, w), naive_bag(values, idx, w),
            jnp.abs(naive_bag(jnp.abs(values), idx, w)).max(),
            jax.grad(loss(bag_op), argnums=(0, 1))(values, w),
            jax.grad(loss(naive_bag), argnums=(0, 1))(values, w),
            [jnp.abs(g).max() for g in jax.grad(abs_loss, argnums=(0, 1))(values, w)])

  out, want_out, out_scale, got, want, term_scale = compare(values, w)
  close(out, want_out, F32_REL, out_scale)
  close(got[0], want[0], F32_REL, term_scale[0])  # table: duplicates summed, unread rows zero
  close(got[1], want[1], F32_REL, term_scale[1])  # weights: <dOut, V[idx]>


@pytest.mark.usefixtures("fast_compile")
@hypothesis.settings(max_examples=10, deadline=None, derandomize=True)
@hypothesis.given(
    seed=st.integers(0, 2**16),
    slots=st.integers(1, 200),
    dim=st.sampled_from([1, 8, 64]),
    tokens=st.integers(1, 40),
    bag=st.integers(1, 20),
)
def test_row_dots_and_their_gradients_match_gather_and_dot(impl, seed, slots, dim, tokens, bag):
  values, idx, _ = random_case(seed, slots, dim, tokens, bag, dup_pool=5)
  x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((tokens, dim)), jnp.float32)
  cot = jax.random.normal(jax.random.PRNGKey(seed), (tokens, bag))
  naive = lambda v, i, x: jnp.einsum("nv,nkv->nk", x, v[i], precision="highest")
  ours = functools.partial(row_dots, impl=impl)

  @jax.jit  # one program per example: eager, every op of each shape compiles on its own
  def compare(values, x):
    loss = lambda f: lambda v, x: jnp.sum(f(v, idx, x) * cot)
    abs_loss = lambda v, x: jnp.sum(naive(jnp.abs(v), idx, jnp.abs(x)) * jnp.abs(cot))
    return (ours(values, idx, x), naive(values, idx, x),
            jnp.abs(naive(jnp.abs(values), idx, jnp.abs(x))).max(),
            jax.grad(loss(ours), argnums=(0, 1))(values, x),
            jax.grad(loss(naive), argnums=(0, 1))(values, x),
            [jnp.abs(g).max() for g in jax.grad(abs_loss, argnums=(0, 1))(values, x)])

  got, want, scale, got_grads, want_grads, scales = compare(values, x)
  close(got, want, F32_REL, scale)
  close(got_grads[0], want_grads[0], F32_REL, scales[0])
  close(got_grads[1], want_grads[1], F32_REL, scales[1])


def test_first_and_last_rows_and_repeated_index_in_one_bag(impl):
  values, _, _ = random_case(0, 16, 8, 1, 1)
  idx = jnp.array([[0, 15, 15, 0, 15]], jnp.int32)
  w = jnp.array([[0.5, 1.0, 2.0, -1.0, 0.25]])
  dvalues = jax.grad(lambda v: jnp.sum(embedding_bag(v, idx, w, impl=impl)))(values)
  np.testing.assert_allclose(dvalues[0], -0.5, rtol=1e-6)
  np.testing.assert_allclose(dvalues[15], 3.25, rtol=1e-6)
  assert not np.asarray(dvalues[1:15]).any()


def test_bfloat16_table_accumulates_in_float32(impl):
  values, idx, w = random_case(1, 64, 16, 8, 32, dtype=jnp.bfloat16)
  out = embedding_bag(values, idx, w, impl=impl)
  assert out.dtype == jnp.float32
  close(out, naive_bag(values, idx, w), F32_REL)
  dvalues = jax.grad(lambda v: jnp.sum(embedding_bag(v, idx, w, impl=impl)))(values)
  assert dvalues.dtype == jnp.bfloat16
  want = jax.grad(lambda v: jnp.sum(naive_bag(v.astype(jnp.float32), idx, w)))(values)
  close(dvalues, want, 2**-8)  # one bfloat16 rounding of a float32 sum


def test_out_of_range_ids_read_the_clamped_row_and_get_no_table_gradient(impl):
  values, _, _ = random_case(6, 10, 4, 1, 1)
  idx = jnp.array([[-3, 2, 10, 99]], jnp.int32)
  w = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  out = embedding_bag(values, idx, w, impl=impl)
  close(out, values[0] + 2 * values[2] + 7 * values[9], F32_REL)
  dvalues, dw = jax.grad(
      lambda v, w: jnp.sum(embedding_bag(v, idx, w, impl=impl)), argnums=(0, 1)
  )(values, w)
  np.testing.assert_allclose(dvalues[2], 2.0)
  assert not np.asarray(dvalues[jnp.array([0, 9])]).any()
  close(dw, jnp.sum(values[jnp.array([0, 2, 9, 9])], axis=-1)[None], F32_REL)


def test_empty_bags_and_no_tokens(impl):
  values, _, _ = random_case(7, 10, 4, 1, 1)
  for shape in ((3, 0), (0, 5)):
    idx, w = jnp.zeros(shape, jnp.int32), jnp.ones(shape)
    assert not np.asarray(embedding_bag(values, idx, w, impl=impl)).any()
    dvalues = jax.grad(lambda v: jnp.sum(embedding_bag(v, idx, w, impl=impl)))(values)
    assert not np.asarray(dvalues).any()


def test_output_takes_the_weights_dtype(impl):
  values, idx, w = random_case(2, 32, 8, 4, 4)
  assert embedding_bag(values, idx, w.astype(jnp.bfloat16), impl=impl).dtype == jnp.bfloat16


def test_indices_get_no_gradient_and_residuals_hold_no_gathered_rows(impl):
  values, idx, w = random_case(3, 1000, 64, 256, 128)
  # The VJP's saved residuals are the primal inputs only: nothing of size tokens x bag x dim.
  _, vjp = jax.vjp(lambda v, w: embedding_bag(v, idx, w, impl=impl), values, w)
  sizes = [x.size for x in jax.tree.leaves(vjp)]
  assert max(sizes) <= values.size
  bag_loss = lambda v, w: jnp.sum(embedding_bag(v, idx, w, impl=impl))
  lowered = jax.jit(jax.grad(bag_loss, argnums=(0, 1)))
  hlo = lowered.lower(values, w).compile().as_text()
  assert "256,128,64" not in hlo.replace(" ", "")


def test_works_under_jit_and_vmap(impl):
  values, idx, w = random_case(4, 50, 8, 6, 5)
  jitted = jax.jit(embedding_bag, static_argnames="impl")
  close(jitted(values, idx, w, impl=impl), naive_bag(values, idx, w), F32_REL)
  bag_op = functools.partial(embedding_bag, impl=impl)
  batched = jax.vmap(bag_op, in_axes=(None, 0, 0))(values, jnp.stack([idx, idx[::-1]]), jnp.stack([w, w]))
  close(batched[0], naive_bag(values, idx, w), F32_REL)
  close(batched[1], naive_bag(values, idx[::-1], w), F32_REL)


def test_inside_shard_map_the_replicated_table_gradient_is_summed(impl):
  # Tokens split over 4 devices, the table replicated: shard_map's types make the gradient of
  # the replicated table the sum over devices; it must equal the unsharded gradient.
  values, idx, w = random_case(8, 64, 8, 16, 12, dup_pool=20)
  cot = jax.random.normal(jax.random.PRNGKey(0), (16, 8))
  loss = lambda v, idx, w, cot: jnp.sum(embedding_bag(v, idx, w, impl=impl) * cot)
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
  P = jax.sharding.PartitionSpec
  place = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

  def local(*args):
    value, (dvalues, dw) = jax.value_and_grad(loss, argnums=(0, 2))(*args)
    return jax.lax.psum(value, "data"), dvalues, dw

  sharded = jax.jit(
      jax.shard_map(
          local,
          mesh=mesh,
          in_specs=(P(), P("data"), P("data"), P("data")),
          out_specs=(P(), P(), P("data")),
      )
  )
  value, dvalues, dw = sharded(
      place(values, P()), place(idx, P("data")), place(w, P("data")), place(cot, P("data"))
  )
  want_value, (want_dvalues, want_dw) = jax.value_and_grad(loss, argnums=(0, 2))(
      values, idx, w, cot
  )
  close(value, want_value, F32_REL)
  close(dvalues, want_dvalues, F32_REL)
  close(dw, want_dw, F32_REL)


def test_impl_dispatch_and_errors(impl):
  assert impl in available_impls() or resolve_impl(impl) == impl
  assert resolve_impl("auto") == ("cpu" if cpu.available() else "xla")  # on a CPU backend
  values, idx, w = random_case(5, 10, 4, 2, 3)
  with pytest.raises(ValueError, match="not available; choose 'auto' or one of"):
    embedding_bag(values, idx, w, impl="cuda")
  with pytest.raises(ValueError, match=r"values \(S, V\), indices \(N, K\)"):
    embedding_bag(values, idx[:, :2], w, impl=impl)
  with pytest.raises(TypeError, match="must be integers"):
    embedding_bag(values, idx.astype(jnp.float32), w, impl=impl)
