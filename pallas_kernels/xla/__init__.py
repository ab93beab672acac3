"""The `xla` impl: the pure-JAX twin of `pallas_kernels.impls`, on every platform.

It is the reference every other impl's tests compare against, and what "auto" falls back to
where a platform's kernels cannot run. Top-k, the product top-k and the row write take memjax's
XLA paths.
"""

from __future__ import annotations

from pallas_kernels.impls import Kernels, bag_backward_xla, bag_forward_xla


def load() -> Kernels:
  return Kernels(bag_forward=bag_forward_xla, bag_backward=bag_backward_xla)
