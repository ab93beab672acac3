"""memjax.ops.product_topk's pruning: only the candidate pairs that can reach the top k are scored
(its results, per impl, are checked in test_lookup_contract.py)."""

import math

import numpy as np
import pytest

from memjax.ops import candidate_pairs


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
