"""memjax.ops.embedding_bag against the materialised gather-and-sum it replaces."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.ops import available_impls, embedding_bag, resolve_impl


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
def test_forward_and_gradients_match_gather_and_sum(seed, slots, dim, tokens, bag, duplicated):
  values, idx, w = random_case(seed, slots, dim, tokens, bag, dup_pool=3 if duplicated else None)
  cot = jax.random.normal(jax.random.PRNGKey(seed), (tokens, dim))
  loss = lambda f: lambda v, w: jnp.sum(f(v, idx, w) * cot)
  abs_loss = lambda v, w: jnp.sum(naive_bag(jnp.abs(v), idx, w) * jnp.abs(cot))
  term_scale = [np.abs(g).max() for g in jax.grad(abs_loss, argnums=(0, 1))(values, w)]
  out_scale = np.abs(naive_bag(jnp.abs(values), idx, w)).max()
  close(embedding_bag(values, idx, w), naive_bag(values, idx, w), F32_REL, out_scale)
  got = jax.grad(loss(embedding_bag), argnums=(0, 1))(values, w)
  want = jax.grad(loss(naive_bag), argnums=(0, 1))(values, w)
  close(got[0], want[0], F32_REL, term_scale[0])  # table: duplicates summed, unread rows zero
  close(got[1], want[1], F32_REL, term_scale[1])  # weights: <dOut, V[idx]>


def test_first_and_last_rows_and_repeated_index_in_one_bag():
  values, _, _ = random_case(0, 16, 8, 1, 1)
  idx = jnp.array([[0, 15, 15, 0, 15]], jnp.int32)
  w = jnp.array([[0.5, 1.0, 2.0, -1.0, 0.25]])
  dvalues = jax.grad(lambda v: jnp.sum(embedding_bag(v, idx, w)))(values)
  np.testing.assert_allclose(dvalues[0], -0.5, rtol=1e-6)
  np.testing.assert_allclose(dvalues[15], 3.25, rtol=1e-6)
  assert not np.asarray(dvalues[1:15]).any()


def test_bfloat16_table_accumulates_in_float32():
  values, idx, w = random_case(1, 64, 16, 8, 32, dtype=jnp.bfloat16)
  out = embedding_bag(values, idx, w)
  assert out.dtype == jnp.float32
  close(out, naive_bag(values, idx, w), F32_REL)
  dvalues = jax.grad(lambda v: jnp.sum(embedding_bag(v, idx, w)))(values)
  assert dvalues.dtype == jnp.bfloat16


def test_output_takes_the_weights_dtype():
  values, idx, w = random_case(2, 32, 8, 4, 4)
  assert embedding_bag(values, idx, w.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_indices_get_no_gradient_and_residuals_hold_no_gathered_rows():
  values, idx, w = random_case(3, 1000, 64, 256, 128)
  # The VJP's saved residuals are the primal inputs only: nothing of size tokens x bag x dim.
  _, vjp = jax.vjp(lambda v, w: embedding_bag(v, idx, w), values, w)
  sizes = [x.size for x in jax.tree.leaves(vjp)]
  assert max(sizes) <= values.size
  lowered = jax.jit(jax.grad(lambda v, w: jnp.sum(embedding_bag(v, idx, w)), argnums=(0, 1)))
  hlo = lowered.lower(values, w).compile().as_text()
  assert "256,128,64" not in hlo.replace(" ", "")


def test_works_under_jit_vmap_and_grad_of_grad_free_paths():
  values, idx, w = random_case(4, 50, 8, 6, 5)
  jitted = jax.jit(embedding_bag, static_argnames="impl")
  close(jitted(values, idx, w, impl="xla"), naive_bag(values, idx, w), F32_REL)
  batched = jax.vmap(embedding_bag, in_axes=(None, 0, 0))(values, idx[None], w[None])
  close(batched[0], naive_bag(values, idx, w), F32_REL)


def test_impl_dispatch_and_errors():
  assert "xla" in available_impls()
  assert resolve_impl("auto") == "xla"  # CPU
  values, idx, w = random_case(5, 10, 4, 2, 3)
  with pytest.raises(ValueError, match="not available; choose 'auto' or one of xla"):
    embedding_bag(values, idx, w, impl="cuda")
  with pytest.raises(ValueError, match=r"values \(S, V\), indices \(N, K\)"):
    embedding_bag(values, idx[:, :2], w)
  with pytest.raises(TypeError, match="must be integers"):
    embedding_bag(values, idx.astype(jnp.float32), w)
