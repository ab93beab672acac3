"""The lookup contract, run by every impl of `pallas_kernels.impls.IMPLS` (a new entry is
picked up with no test edited; impls whose kernels cannot run here are skipped, marked with their
platform): the embedding bag and its gradients, the row dots built on its kernels, and the
kernels an impl may bring for the rest (top-k, the product top-k, the row write), each against
the materialised computation it replaces or the XLA path it stands in for."""

import functools

import hypothesis
import hypothesis.strategies as st
from hypothesis import HealthCheck, assume, given, settings
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.ops import dispatch, embedding_bag, product_topk, row_dots, set_rows
from support.lookup import (
    ALL_IMPLS, F32_REL, impls_providing, naive_bag, random_case, assert_close as close,
)

bag_impls = pytest.mark.parametrize("impl", ALL_IMPLS)


# ----------------------------------------------------------------------------------------------
# The embedding bag and the row dots: every impl.


@bag_impls
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
  values, idx, w, _ = random_case(seed, slots, dim, tokens, bag, dup_pool=3 if duplicated else None)
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


@bag_impls
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
  values, idx, _, _ = random_case(seed, slots, dim, tokens, bag, dup_pool=5)
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


@bag_impls
def test_first_and_last_rows_and_repeated_index_in_one_bag(impl):
  values, _, _, _ = random_case(0, 16, 8, 1, 1)
  idx = jnp.array([[0, 15, 15, 0, 15]], jnp.int32)
  w = jnp.array([[0.5, 1.0, 2.0, -1.0, 0.25]])
  dvalues = jax.grad(lambda v: jnp.sum(embedding_bag(v, idx, w, impl=impl)))(values)
  np.testing.assert_allclose(dvalues[0], -0.5, rtol=1e-6)
  np.testing.assert_allclose(dvalues[15], 3.25, rtol=1e-6)
  assert not np.asarray(dvalues[1:15]).any()


@bag_impls
def test_bfloat16_table_accumulates_in_float32(impl):
  values, idx, w, _ = random_case(1, 64, 16, 8, 32, dtype=jnp.bfloat16)
  out = embedding_bag(values, idx, w, impl=impl)
  assert out.dtype == jnp.float32
  close(out, naive_bag(values, idx, w), F32_REL)
  dvalues = jax.grad(lambda v: jnp.sum(embedding_bag(v, idx, w, impl=impl)))(values)
  assert dvalues.dtype == jnp.bfloat16
  want = jax.grad(lambda v: jnp.sum(naive_bag(v.astype(jnp.float32), idx, w)))(values)
  close(dvalues, want, 2**-8)  # one bfloat16 rounding of a float32 sum


@bag_impls
def test_out_of_range_ids_read_the_clamped_row_and_get_no_table_gradient(impl):
  values, _, _, _ = random_case(6, 10, 4, 1, 1)
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


@bag_impls
def test_empty_bags_and_no_tokens(impl):
  values, _, _, _ = random_case(7, 10, 4, 1, 1)
  for shape in ((3, 0), (0, 5)):
    idx, w = jnp.zeros(shape, jnp.int32), jnp.ones(shape)
    assert not np.asarray(embedding_bag(values, idx, w, impl=impl)).any()
    dvalues = jax.grad(lambda v: jnp.sum(embedding_bag(v, idx, w, impl=impl)))(values)
    assert not np.asarray(dvalues).any()


@bag_impls
def test_output_takes_the_weights_dtype(impl):
  values, idx, w, _ = random_case(2, 32, 8, 4, 4)
  assert embedding_bag(values, idx, w.astype(jnp.bfloat16), impl=impl).dtype == jnp.bfloat16


@bag_impls
def test_indices_get_no_gradient_and_residuals_hold_no_gathered_rows(impl):
  values, idx, w, _ = random_case(3, 1000, 64, 256, 128)
  # The VJP's saved residuals are the primal inputs only: nothing of size tokens x bag x dim.
  _, vjp = jax.vjp(lambda v, w: embedding_bag(v, idx, w, impl=impl), values, w)
  sizes = [x.size for x in jax.tree.leaves(vjp)]
  assert max(sizes) <= values.size
  bag_loss = lambda v, w: jnp.sum(embedding_bag(v, idx, w, impl=impl))
  lowered = jax.jit(jax.grad(bag_loss, argnums=(0, 1)))
  hlo = lowered.lower(values, w).compile().as_text()
  assert "256,128,64" not in hlo.replace(" ", "")


@bag_impls
def test_works_under_jit_and_vmap(impl):
  values, idx, w, _ = random_case(4, 50, 8, 6, 5)
  jitted = jax.jit(embedding_bag, static_argnames="impl")
  close(jitted(values, idx, w, impl=impl), naive_bag(values, idx, w), F32_REL)
  bag_op = functools.partial(embedding_bag, impl=impl)
  batched = jax.vmap(bag_op, in_axes=(None, 0, 0))(values, jnp.stack([idx, idx[::-1]]), jnp.stack([w, w]))
  close(batched[0], naive_bag(values, idx, w), F32_REL)
  close(batched[1], naive_bag(values, idx[::-1], w), F32_REL)


@bag_impls
def test_inside_shard_map_the_replicated_table_gradient_is_summed(impl):
  # Tokens split over 4 devices, the table replicated: shard_map's types make the gradient of
  # the replicated table the sum over devices; it must equal the unsharded gradient.
  values, idx, w, _ = random_case(8, 64, 8, 16, 12, dup_pool=20)
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

@bag_impls
def test_the_gradients_are_the_same_bit_for_bit_on_every_run(impl):
  # Many duplicates, and enough tokens that a multi-threaded kernel splits them.
  rng = np.random.default_rng(0)
  values = jnp.asarray(rng.standard_normal((5000, 96)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, 300, (2048, 64)), jnp.int32)
  w = jnp.asarray(rng.random((2048, 64)), jnp.float32)
  grad = jax.jit(jax.grad(
      lambda v, w: jnp.sum(embedding_bag(v, idx, w, impl=impl) ** 2), argnums=(0, 1)))
  for first, second in zip(grad(values, w), grad(values, w)):
    np.testing.assert_array_equal(first, second)


@bag_impls
def test_a_bad_call_names_what_it_expected(impl):
  values, idx, w, _ = random_case(5, 10, 4, 2, 3)
  with pytest.raises(ValueError, match=r"values \(S, V\), indices \(N, K\)"):
    embedding_bag(values, idx[:, :2], w, impl=impl)
  with pytest.raises(TypeError, match="must be integers"):
    embedding_bag(values, idx.astype(jnp.float32), w, impl=impl)


# ----------------------------------------------------------------------------------------------
# Top-k: the impls that bring a kernel for it, against lax.top_k.

top_k_impls = pytest.mark.parametrize("impl", impls_providing("top_k"))



def impl_top_k(impl):
  return dispatch.kernels(impl).top_k


def assert_same_top_k(impl, x, k):
  values, idx = jax.jit(impl_top_k(impl), static_argnums=1)(x, k)
  want_values, want_idx = jax.lax.top_k(x, k)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(values, want_values)


@top_k_impls
@pytest.mark.parametrize("shape,k", [((1, 1), 1), ((5, 7), 1), ((5, 7), 7), ((300, 256), 32),
                                     ((2, 3, 40), 9), ((1, 1000), 999)])
def test_top_k_equals_lax_top_k(impl, shape, k):
  x = jax.random.normal(jax.random.PRNGKey(k), shape)
  assert_same_top_k(impl, x, k)


@top_k_impls
def test_top_k_ties_signed_zeros_infinities_and_nans_order_as_lax_top_k(impl):
  rng = np.random.default_rng(0)
  x = rng.integers(-2, 3, (64, 50)).astype(np.float32)  # ties everywhere
  x[:, 3], x[:, 4], x[:, 5], x[:, 6] = -0.0, 0.0, np.inf, -np.inf
  x[::3, 7] = np.nan
  x[1::3, 8] = -np.nan
  for k in (1, 5, 17, 50):
    assert_same_top_k(impl, jnp.asarray(x), k)


@top_k_impls
def test_top_k_of_bfloat16_and_its_gradient(impl):
  x = jax.random.normal(jax.random.PRNGKey(1), (33, 64)).astype(jnp.bfloat16)
  assert_same_top_k(impl, x, 8)
  x32 = x.astype(jnp.float32)
  cot = jax.random.normal(jax.random.PRNGKey(2), (33, 8))
  grad = jax.grad(lambda x: jnp.sum(impl_top_k(impl)(x, 8)[0] * cot))(x32)
  want = jax.grad(lambda x: jnp.sum(jax.lax.top_k(x, 8)[0] * cot))(x32)
  np.testing.assert_array_equal(grad, want)


@top_k_impls
def test_top_k_under_vmap(impl):
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 6, 20))
  _, idx = jax.vmap(lambda x: impl_top_k(impl)(x, 5))(x)
  np.testing.assert_array_equal(idx, jax.lax.top_k(x, 5)[1])


# ----------------------------------------------------------------------------------------------
# The product top-k: the exact top-k of the n x n grid with the reference's tie-breaking, for the
# impls that bring top-k kernels.



def with_impls(test):
  parametrized = pytest.mark.parametrize("impl", impls_providing("top_k", "product_topk", xla=True))
  return pytest.mark.usefixtures("fast_compile")(parametrized(test))
# Every new shape compiles (one jitted program is cheaper than op-by-op); 20 examples per
# property cover the space without a long run.
SETTINGS = settings(
    max_examples=20, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
jitted_product_topk = jax.jit(product_topk, static_argnums=(2, 3))


def brute_force_topk(s1_RM: np.ndarray, s2_RM: np.ndarray, knn: int):
  """All n^2 slots scored (slot i1 * n + i2 is the flat index of the outer sum), sorted."""
  grid_RS = (s1_RM[:, :, None] + s2_RM[:, None, :]).reshape(len(s1_RM), -1)
  order_RS = np.argsort(-grid_RS, axis=-1, kind="stable")
  return np.take_along_axis(grid_RS, order_RS, -1), order_RS


@functools.partial(jax.jit, static_argnums=2)
def full_grid_topk(s1_RM, s2_RM, knn: int):
  """The reference's algorithm without pruning: top k per half, the whole k x k grid flattened
  with i outer and j inner, top k of that (lax.top_k: the lower index wins a tie)."""
  n = s1_RM.shape[-1]
  a_RK, i1_RK = jax.lax.top_k(s1_RM, knn)
  b_RK, i2_RK = jax.lax.top_k(s2_RM, knn)
  grid_RG = (a_RK[:, :, None] + b_RK[:, None, :]).reshape(len(s1_RM), -1)
  slots_RG = (i1_RK[:, :, None] * n + i2_RK[:, None, :]).reshape(len(s1_RM), -1)
  scores_RK, best_RK = jax.lax.top_k(grid_RG, knn)
  return scores_RK, jnp.take_along_axis(slots_RG, best_RK, -1)


@st.composite
def problems(draw, integer_scores: bool):
  knn = draw(st.integers(1, 32))
  n = draw(st.integers(knn, 64))
  rows = draw(st.integers(1, 3))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  if integer_scores:  # a handful of values: ties everywhere, in both halves and in the grid
    s1, s2 = (rng.integers(-2, 3, (rows, n)).astype(np.float32) for _ in range(2))
  else:
    s1, s2 = (rng.standard_normal((rows, n)).astype(np.float32) for _ in range(2))
  return s1, s2, knn


@with_impls
@SETTINGS
@given(problems(integer_scores=False))
def test_equals_brute_force(impl, problem):
  s1_RM, s2_RM, knn = problem
  scores_RK, slots_RK = jitted_product_topk(jnp.asarray(s1_RM), jnp.asarray(s2_RM), knn, impl)
  want_scores_RS, want_slots_RS = brute_force_topk(s1_RM, s2_RM, knn)
  # Continuous random scores: a tie at the cut (which would make the set ambiguous) is rare.
  if knn < want_scores_RS.shape[-1]:
    assume((want_scores_RS[:, knn - 1] > want_scores_RS[:, knn]).all())
  np.testing.assert_array_equal(scores_RK, want_scores_RS[:, :knn])  # same float32 sums
  np.testing.assert_array_equal(np.sort(slots_RK), np.sort(want_slots_RS[:, :knn]))
  assert (np.diff(np.asarray(scores_RK), axis=-1) <= 0).all()  # sorted descending


@with_impls
@SETTINGS
@given(problems(integer_scores=True))
def test_equals_full_grid_with_ties(impl, problem):
  s1_RM, s2_RM, knn = problem
  scores_RK, slots_RK = jitted_product_topk(jnp.asarray(s1_RM), jnp.asarray(s2_RM), knn, impl)
  want_scores_RK, want_slots_RK = full_grid_topk(jnp.asarray(s1_RM), jnp.asarray(s2_RM), knn)
  np.testing.assert_array_equal(scores_RK, want_scores_RK)
  np.testing.assert_array_equal(slots_RK, want_slots_RK)  # same slots, same order


@with_impls
def test_tie_breaking_follows_the_flattened_grid(impl):
  # Both halves constant: every pair ties, so the winners are the first k of the flattened grid,
  # i.e. (0, 0), (0, 1), ..., with i1 = i2 = sub-key order from lax.top_k (lowest index first).
  n, knn = 6, 4
  ones = jnp.ones((1, n), jnp.float32)
  scores_RK, slots_RK = jitted_product_topk(ones, ones, knn, impl)
  np.testing.assert_array_equal(scores_RK, [[2.0] * knn])
  np.testing.assert_array_equal(slots_RK, [[0, 1, 2, 3]])


@with_impls
@SETTINGS
@given(problems(integer_scores=False))
def test_gradients_reach_only_selected_entries(impl, problem):
  s1_RM, s2_RM, knn = problem
  n = s1_RM.shape[-1]
  cot_RK = np.random.default_rng(knn).standard_normal((len(s1_RM), knn)).astype(np.float32)
  loss = lambda s1, s2: jnp.sum(product_topk(s1, s2, knn, impl)[0] * cot_RK)
  d1_RM, d2_RM = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(s1_RM), jnp.asarray(s2_RM))
  _, slots_RK = jitted_product_topk(jnp.asarray(s1_RM), jnp.asarray(s2_RM), knn, impl)
  # Score k is s1[i1] + s2[i2]: its cotangent goes to exactly those two entries.
  want1_RM, want2_RM = np.zeros_like(s1_RM), np.zeros_like(s2_RM)
  for r, k in np.ndindex(slots_RK.shape):
    want1_RM[r, int(slots_RK[r, k]) // n] += cot_RK[r, k]
    want2_RM[r, int(slots_RK[r, k]) % n] += cot_RK[r, k]
  np.testing.assert_allclose(d1_RM, want1_RM, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(d2_RM, want2_RM, rtol=1e-6, atol=1e-6)


@with_impls
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_product_topk_equals_the_xla_path_bit_for_bit(impl, dtype):
  # float32 takes a fused kernel where the impl has one; bfloat16 the steps with its top-k.
  s1, s2 = (jax.random.normal(jax.random.PRNGKey(i), (512, 64)).astype(dtype) for i in (4, 5))
  for knn in (1, 7, 32, 64):
    got = product_topk(s1, s2, knn, impl=impl)
    want = product_topk(s1, s2, knn, impl="xla")
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


# ----------------------------------------------------------------------------------------------
# The row write: the impls that bring a kernel for it, against XLA's scatter, in place.

set_rows_impls = pytest.mark.parametrize("impl", impls_providing("set_rows"))


@set_rows_impls
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32])
def test_set_rows_writes_the_listed_rows_in_place_and_skips_padding(impl, dtype):
  rng = np.random.default_rng(0)
  n_slots, dim = 1000, 24
  rows = np.sort(rng.choice(n_slots, 60, replace=False)).astype(np.int32)
  rows[-7:] = n_slots  # padding, as compact_rows pads
  table = jnp.asarray(rng.standard_normal((n_slots, dim)) * 100, dtype)
  new = jnp.asarray(rng.standard_normal((60, dim)) * 100, dtype)
  want = np.asarray(table.at[rows].set(new, mode="drop"))
  write = jax.jit(lambda t, r, n: set_rows(t, r, n, impl=impl), donate_argnums=0)
  address = table.unsafe_buffer_pointer()
  got = write(table, jnp.asarray(rows), new)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert got.unsafe_buffer_pointer() == address  # the donated table itself, not a copy


@set_rows_impls
def test_set_rows_with_a_factor_scales_every_other_row_as_xla_does(impl):
  rng = np.random.default_rng(1)
  table = jnp.asarray(rng.standard_normal((500, 16)), jnp.float32)
  rows = jnp.asarray([3, 7, 499, 500], jnp.int32)
  new = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
  factor = jnp.float32(0.95)
  want = np.asarray((factor * table).at[rows].set(new, mode="drop"))
  got = jax.jit(lambda t, f: set_rows(t, rows, new, impl=impl, factor=f), donate_argnums=0)(
      table, factor)
  np.testing.assert_array_equal(np.asarray(got), want)
