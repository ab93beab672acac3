"""CPU kernels for the memory lookup: the `cpu` impl (see `pallas_kernels.impls`).

XLA:CPU runs the two costly steps of a memory layer on one thread and far from the memory
system's limits: its TopK custom call and the scatter of the table gradient. `lookup.cc` does
both, and the bag's forward and weight gradient, as XLA FFI custom calls over XLA's intra-op
thread pool; and the in-place write of a table's updated rows (`set_rows`), which XLA:CPU does
through a float32 copy of a 16-bit table. The library is compiled with the system C++ compiler
on first use and cached (see `build`); where it cannot be, the impl is unavailable and "auto"
takes the `xla` twin.
"""

from __future__ import annotations

from pallas_kernels.cpu.build import BuildError
from pallas_kernels.cpu.ops import (
    bag_backward, bag_forward, load_error, product_topk, set_rows, top_k,
)
from pallas_kernels.impls import Kernels

__all__ = ["BuildError", "bag_backward", "bag_forward", "load", "product_topk", "set_rows", "top_k"]


def load() -> Kernels:
  """The kernels, built first if no cached build fits this machine. Raises BuildError."""
  error = load_error()
  if error is not None:
    raise error
  return Kernels(
      bag_forward=bag_forward, bag_backward=bag_backward, top_k=top_k,
      product_topk=product_topk, set_rows=set_rows,
  )
