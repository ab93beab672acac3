"""The `pallas_tpu` impl: the kernels of `embedding_bag.py` behind the protocol's bag
forward/backward signatures, Mosaic on TPU and interpret mode on other platforms."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.impls import bag_backward_xla, bag_forward_xla, varying_axes
from pallas_kernels.tpu import embedding_bag as kernels

_NATIVE_TABLES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_NATIVE_FLOATS = (*_NATIVE_TABLES, jnp.dtype(jnp.float16))


def _interpreted(kernel, twin, *args, **kwargs):
  """`kernel` in interpret mode; inside shard_map, its pure-JAX twin.

  Pallas's plain interpreter loses its operands' varying-axes types inside shard_map, which
  jax 0.10 rejects; the TPU interpreter's callbacks cannot sit in `platform_dependent` (and it
  is far too slow on simulated devices under shard_map to serve). So a sharded lookup off TPU
  computes the same sums with XLA ops; on TPU the kernels run everywhere.
  """
  if varying_axes(*args):
    return twin(*args, **kwargs)
  return kernel(*args, interpret=True, **kwargs)


def _by_platform(kernel, twin, *args, **kwargs):
  """`kernel` compiled by Mosaic where the lowering platform is TPU, interpreted elsewhere.

  The choice is made when lowering, so one traced program serves both (an ahead-of-time compile
  for TPU from a CPU host, the same function run on CPU). The plain interpreter is the one that
  has no side effects, which `platform_dependent` needs of its branches; the tests also run the
  kernels under the TPU interpreter.
  """
  return jax.lax.platform_dependent(
      *args,
      tpu=functools.partial(kernel, interpret=False, **kwargs),
      default=functools.partial(_interpreted, kernel, twin, **kwargs),
  )


def _native(values_SV: jax.Array, *floats: jax.Array) -> bool:
  """Whether the kernels take these operands; others go to the XLA twin: float64 (under
  jax_enable_x64) and other dtypes, and rows narrower than whole 128-lane tiles (a small model's
  table, or its column slice on a wide memory axis), which Mosaic cannot copy one row at a time."""
  return (
      values_SV.dtype in _NATIVE_TABLES
      and all(a.dtype in _NATIVE_FLOATS for a in floats)
      and values_SV.shape[1] % kernels.LANES == 0
  )


def bag_forward(values_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array) -> jax.Array:
  """The `pallas_tpu` forward: (N, V) float32."""
  n_tokens, bag = idx_NK.shape
  if not _native(values_SV, w_NK) or n_tokens == 0 or bag == 0:
    return bag_forward_xla(values_SV, idx_NK, w_NK)
  return _by_platform(kernels.gather_bag, bag_forward_xla, values_SV, idx_NK, w_NK)


def bag_backward(
    values_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array, dout_NV: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The `pallas_tpu` backward: the dense table gradient in the table's dtype (each row written
  once, from a row-sorted walk) and the float32 weight gradient (a gather-dot)."""
  n_tokens, bag = idx_NK.shape
  if not _native(values_SV, w_NK, dout_NV) or n_tokens == 0 or bag == 0:
    return bag_backward_xla(values_SV, idx_NK, w_NK, dout_NV)
  dtype = values_SV.dtype
  table_twin = lambda idx, w, dout, **_: bag_backward_xla(values_SV, idx, w, dout)[0].astype(dtype)
  weights_twin = lambda values, idx, dout: bag_backward_xla(values, idx, w_NK, dout)[1]
  dvalues_SV = _by_platform(kernels.table_grad, table_twin, idx_NK, w_NK, dout_NV,
                            n_slots=values_SV.shape[0], dtype=dtype)
  dw_NK = _by_platform(kernels.gather_dot, weights_twin, values_SV, idx_NK, dout_NV)
  return dvalues_SV, dw_NK
