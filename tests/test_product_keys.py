"""memjax.ops.product_topk: the exact top-k of the n x n product grid, with the reference's
tie-breaking, from only the candidate pairs that can win."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lookup_impls import IMPLS
from memjax.ops import candidate_pairs
from memjax.ops import product_topk as _product_topk

pytestmark = pytest.mark.usefixtures("fast_compile")

# Every new shape compiles (one jitted program is cheaper than op-by-op); 20 examples per
# property cover the space without a long run.
SETTINGS = settings(
    max_examples=20, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
product_topk = jax.jit(_product_topk, static_argnums=(2, 3))
with_impls = pytest.mark.parametrize("impl", IMPLS)


def brute_force_topk(s1_RN: np.ndarray, s2_RN: np.ndarray, knn: int):
  """All n^2 slots scored (slot i1 * n + i2 is the flat index of the outer sum), sorted."""
  grid_RS = (s1_RN[:, :, None] + s2_RN[:, None, :]).reshape(len(s1_RN), -1)
  order_RS = np.argsort(-grid_RS, axis=-1, kind="stable")
  return np.take_along_axis(grid_RS, order_RS, -1), order_RS


@functools.partial(jax.jit, static_argnums=2)
def full_grid_topk(s1_RN, s2_RN, knn: int):
  """The reference's algorithm without pruning: top k per half, the whole k x k grid flattened
  with i outer and j inner, top k of that (lax.top_k: the lower index wins a tie)."""
  n = s1_RN.shape[-1]
  a_RK, i1_RK = jax.lax.top_k(s1_RN, knn)
  b_RK, i2_RK = jax.lax.top_k(s2_RN, knn)
  grid_RG = (a_RK[:, :, None] + b_RK[:, None, :]).reshape(len(s1_RN), -1)
  slots_RG = (i1_RK[:, :, None] * n + i2_RK[:, None, :]).reshape(len(s1_RN), -1)
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
  s1_RN, s2_RN, knn = problem
  scores_RK, slots_RK = product_topk(jnp.asarray(s1_RN), jnp.asarray(s2_RN), knn, impl)
  want_scores_RS, want_slots_RS = brute_force_topk(s1_RN, s2_RN, knn)
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
  s1_RN, s2_RN, knn = problem
  scores_RK, slots_RK = product_topk(jnp.asarray(s1_RN), jnp.asarray(s2_RN), knn, impl)
  want_scores_RK, want_slots_RK = full_grid_topk(jnp.asarray(s1_RN), jnp.asarray(s2_RN), knn)
  np.testing.assert_array_equal(scores_RK, want_scores_RK)
  np.testing.assert_array_equal(slots_RK, want_slots_RK)  # same slots, same order


@with_impls
def test_tie_breaking_follows_the_flattened_grid(impl):
  # Both halves constant: every pair ties, so the winners are the first k of the flattened grid,
  # i.e. (0, 0), (0, 1), ..., with i1 = i2 = sub-key order from lax.top_k (lowest index first).
  n, knn = 6, 4
  ones = jnp.ones((1, n), jnp.float32)
  scores_RK, slots_RK = product_topk(ones, ones, knn, impl)
  np.testing.assert_array_equal(scores_RK, [[2.0] * knn])
  np.testing.assert_array_equal(slots_RK, [[0, 1, 2, 3]])


@pytest.mark.parametrize("knn", [1, 2, 3, 4, 8, 16, 32, 100, 1024])
def test_candidate_pairs(knn):
  rows, cols = candidate_pairs(knn)
  pairs = set(zip(rows.tolist(), cols.tolist()))
  everything = {(i, j) for i in range(knn) for j in range(knn) if (i + 1) * (j + 1) <= knn}
  assert pairs == everything and len(pairs) == len(rows)
  # The divisor-sum count: sum_i floor(k / i) = k ln k + (2 gamma - 1) k + O(sqrt k).
  assert len(rows) == sum(knn // i for i in range(1, knn + 1))
  assert len(rows) <= knn * (math.log(knn) + 1) + 1
  if knn >= 16:
    assert len(rows) >= knn * math.log(knn)
  # Flattened-grid order (i outer, j inner): what makes the tie-breaking match.
  flat = rows.astype(np.int64) * knn + cols
  assert (np.diff(flat) > 0).all()


@with_impls
@SETTINGS
@given(problems(integer_scores=False))
def test_gradients_reach_only_selected_entries(impl, problem):
  s1_RN, s2_RN, knn = problem
  n = s1_RN.shape[-1]
  cot_RK = np.random.default_rng(knn).standard_normal((len(s1_RN), knn)).astype(np.float32)
  loss = lambda s1, s2: jnp.sum(_product_topk(s1, s2, knn, impl)[0] * cot_RK)
  d1_RN, d2_RN = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(s1_RN), jnp.asarray(s2_RN))
  _, slots_RK = product_topk(jnp.asarray(s1_RN), jnp.asarray(s2_RN), knn, impl)
  # Score k is s1[i1] + s2[i2]: its cotangent goes to exactly those two entries.
  want1_RN, want2_RN = np.zeros_like(s1_RN), np.zeros_like(s2_RN)
  for r, k in np.ndindex(slots_RK.shape):
    want1_RN[r, int(slots_RK[r, k]) // n] += cot_RK[r, k]
    want2_RN[r, int(slots_RK[r, k]) % n] += cot_RK[r, k]
  np.testing.assert_allclose(d1_RN, want1_RN, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(d2_RN, want2_RN, rtol=1e-6, atol=1e-6)
