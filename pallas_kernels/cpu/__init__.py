"""CPU kernels for the memory lookup: the `cpu` impl of `memjax.ops.embedding_bag` and top-k.

XLA:CPU runs the two costly steps of a memory layer on one thread and far from the memory
system's limits: its TopK custom call (about 4.5 us per row of 256 scores) and the scatter of the
table gradient. `lookup.cc` does both, and the bag's forward and weight gradient, as XLA FFI
custom calls over XLA's intra-op thread pool; and the in-place write of a table's updated rows
(`set_rows`), which XLA:CPU does through a float32 copy of a 16-bit table. The library is compiled with the system C++
compiler on first use and cached (see `build`); the pure-JAX `xla` impl is the reference twin
its tests compare against, and the fallback where no compiler is at hand.
"""

from __future__ import annotations

from pallas_kernels.cpu.build import BuildError
from pallas_kernels.cpu.ops import (
    available,
    bag_backward,
    bag_forward,
    load_error,
    product_topk,
    set_rows,
    top_k,
    unavailable_reason,
)

__all__ = [
    "BuildError",
    "available",
    "bag_backward",
    "bag_forward",
    "load_error",
    "product_topk",
    "register",
    "set_rows",
    "top_k",
    "unavailable_reason",
]


def register() -> None:
  """Builds the kernels if needed and registers them as memjax's `cpu` impl. Raises BuildError."""
  from memjax.ops import register_impl, register_set_rows, register_top_k

  error = load_error()
  if error is not None:
    raise error
  register_impl("cpu", bag_forward, bag_backward)
  register_top_k("cpu", top_k, product_topk)
  register_set_rows("cpu", set_rows)
