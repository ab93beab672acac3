"""Pallas TPU kernels for the memory lookup: the `pallas_tpu` impl (see `pallas_kernels.impls`).

`embedding_bag.py` holds the three kernels (forward gather-sum, weight-gradient gather-dot,
row-sorted table gradient after an XLA sort) and their design note; `ops.py` fits them to the
protocol. On a TPU they compile through Mosaic; on any other platform they run in Pallas's
interpret mode, slowly but with the same copies and sums, which is how the tests check them
against the `xla` twin on CPU (inside shard_map off TPU, the twin runs instead: see `ops.py`).
"""

from __future__ import annotations

from pallas_kernels.impls import Kernels
from pallas_kernels.tpu.embedding_bag import (
    gather_bag,
    gather_dot,
    sort_by_row,
    sorted_row_grad,
    table_grad,
)
from pallas_kernels.tpu.ops import bag_backward, bag_forward

__all__ = [
    "bag_backward",
    "bag_forward",
    "gather_bag",
    "gather_dot",
    "load",
    "sort_by_row",
    "sorted_row_grad",
    "table_grad",
]


def load() -> Kernels:
  """The kernels: Mosaic where a program is lowered for TPU, interpret mode elsewhere."""
  return Kernels(bag_forward=bag_forward, bag_backward=bag_backward)
