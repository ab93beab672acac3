"""Product-key selection: the exact top-k over the n x n grid of summed half scores.

The reference takes the top k of each half, scores all k*k pairs (i, j) as a_i + b_j with slot
index i1_i * n + i2_j, and takes the top k of that grid (flattened with i outer). Both half lists
are sorted, so pair (i, j) is matched or beaten by every (i', j') with i' <= i and j' <= j, which
also come first in the flattened grid and so win ties. A pair with (i+1)(j+1) > k therefore has
at least k pairs ahead of it and can never be selected: only about k*ln(k) pairs are scored.

Axis letters (see memjax): R selection rows (tokens x heads), M sub-keys per half (n), K top-k,
I candidate pairs of the grid.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from memjax.ops.dispatch import kernels


@functools.lru_cache(maxsize=None)
def candidate_pairs(knn: int) -> tuple[np.ndarray, np.ndarray]:
  """Grid rows i and columns j that can reach the top `knn`, in flattened-grid order."""
  i, j = np.meshgrid(np.arange(knn), np.arange(knn), indexing="ij")
  keep = (i + 1) * (j + 1) <= knn
  return i[keep].astype(np.int32), j[keep].astype(np.int32)


def product_topk(
    scores1_RM: jax.Array, scores2_RM: jax.Array, knn: int, impl: str = "xla"
) -> tuple[jax.Array, jax.Array]:
  """Top `knn` slots of the product grid, per row.

  Args:
    scores1_RM: (R, M) scores of the first sub-key set (R = tokens x heads, M = n).
    scores2_RM: (R, M) scores of the second sub-key set.
    knn: k, at most n.
    impl: the lookup's impl ("auto" or a name); its top-k kernels where it has them, else
      `lax.top_k`.

  Returns:
    (scores_RK, slots_RK): summed scores, sorted descending, and slot ids i1 * n + i2 in [0, n^2).
    Gradients flow to the selected entries of both score arrays.
  """
  lookup = kernels(impl)
  if lookup.product_topk is not None and scores1_RM.dtype == scores2_RM.dtype == jnp.float32:
    return lookup.product_topk(scores1_RM, scores2_RM, knn)
  top_k = lookup.top_k or jax.lax.top_k
  n_keys = scores1_RM.shape[-1]
  a_RK, i1_RK = top_k(scores1_RM, knn)
  b_RK, i2_RK = top_k(scores2_RM, knn)
  rows, cols = candidate_pairs(knn)
  grid_RI = a_RK[:, rows] + b_RK[:, cols]
  slots_RI = i1_RK[:, rows] * n_keys + i2_RK[:, cols]
  scores_RK, best_RK = top_k(grid_RI, knn)
  return scores_RK, jnp.take_along_axis(slots_RI, best_RK, axis=-1)
