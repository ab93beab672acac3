"""Triton kernels for the memory lookup on GPUs: the `triton` impl (see `pallas_kernels.impls`).

The forward is a program per token (and block of columns) that loads several rows of its bag at a
time and sums them in float32. The backward sorts the lookups by table row with XLA ops, then a
program per block of rows sums w * dOut over each row's lookups and writes the row once (zeros for
rows nobody read): a deterministic dense table gradient with no atomics, and the weight gradients
<dOut[t], V[row]> from one read of each row. jax-triton calls them from JAX (`ops`); the `xla`
impl is the reference twin that the tests compare against, on the CPU under Triton's interpreter
and on a GPU through `embedding_bag`.

Needs an NVIDIA GPU visible to JAX, `triton` and `jax-triton` (the `gpu` extra).
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.impls import Kernels, Unavailable


@functools.cache
def unavailable_reason() -> str | None:
  """None when the kernels can run here, else why not (checked once per process)."""
  try:
    if not jax.devices("gpu"):
      raise RuntimeError
  except RuntimeError:
    return f"no GPU visible to JAX (default backend: {jax.default_backend()})"
  try:
    import triton  # noqa: F401
  except ImportError as error:
    return f"triton is not installed ({error}); install memjax[gpu]"
  try:
    import jax_triton  # noqa: F401
  except ImportError as error:
    return f"jax-triton is not installed ({error}); install memjax[gpu]"
  except Exception as error:  # noqa: BLE001  (an incompatible jax breaks its import in many ways)
    return f"jax-triton does not import with jax {jax.__version__}: {error!r}"
  return None


def load() -> Kernels:
  """The kernels; `Unavailable` (with the reason) where they cannot run, and then "auto" takes
  the xla twin. `ops` imports triton, so it is imported only here."""
  reason = unavailable_reason()
  if reason is not None:
    raise Unavailable(reason)
  from pallas_kernels.gpu.ops import bag_backward, bag_forward

  return Kernels(bag_forward=bag_forward, bag_backward=bag_backward)


__all__ = ["load", "unavailable_reason"]
