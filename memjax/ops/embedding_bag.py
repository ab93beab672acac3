"""The memory read: a weighted embedding bag, out[t] = sum_k w[t, k] * V[idx[t, k]].

Every impl (`pallas_kernels.impls`) honours one `jax.custom_vjp` contract:

- forward never materialises the gathered (tokens x bag x dim) rows;
- backward returns the dense table gradient (duplicate indices summed) and the per-weight
  gradient <dOut[t], V[idx[t, k]]>; indices get no gradient;
- the residuals are the primal inputs only (the table, indices and weights).

Accumulation is float32; the output has the weights' dtype, the table gradient the table's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.ops.dispatch import kernels, resolve_impl
from pallas_kernels.impls import to_varying, varying_axes


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _embedding_bag(values_SV, idx_NK, w_NK, impl):
  out_NV = kernels(impl).bag_forward(values_SV, idx_NK, w_NK).astype(w_NK.dtype)
  # Kernels (custom calls) return arrays that shard_map sees as replicated; the result varies
  # like the inputs, which `embedding_bag` has made alike.
  return to_varying(out_NV, varying_axes(values_SV))


def _embedding_bag_fwd(values_SV, idx_NK, w_NK, impl):
  return _embedding_bag(values_SV, idx_NK, w_NK, impl), (values_SV, idx_NK, w_NK)


def _embedding_bag_bwd(impl, residuals, dout_NV):
  values_SV, idx_NK, w_NK = residuals
  dvalues_SV, dw_NK = kernels(impl).bag_backward(values_SV, idx_NK, w_NK, dout_NV)
  axes = varying_axes(values_SV)
  return (
      to_varying(dvalues_SV.astype(values_SV.dtype), axes),
      None,
      to_varying(dw_NK.astype(w_NK.dtype), axes),
  )


_embedding_bag.defvjp(_embedding_bag_fwd, _embedding_bag_bwd)


def embedding_bag(
    values: jax.Array, indices: jax.Array, weights: jax.Array, impl: str = "auto"
) -> jax.Array:
  """Weighted sum of table rows per token.

  Args:
    values: (S, V) table; any float dtype.
    indices: (N, K) integer row ids in [0, S); out-of-range ids read row 0 or S-1 and receive no
      gradient.
    weights: (N, K) float weights.
    impl: "auto" (by platform), or a name in `pallas_kernels.impls.IMPLS`.

  Returns:
    (N, V) in the weights' dtype.
  """
  if values.ndim != 2 or indices.ndim != 2 or indices.shape != weights.shape:
    raise ValueError(
        "embedding_bag expects values (S, V), indices (N, K) and weights (N, K); got "
        f"{values.shape}, {indices.shape} and {weights.shape}"
    )
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(f"embedding_bag indices must be integers, got {indices.dtype}")
  # Inside shard_map, a table replicated over an axis that the tokens vary over is cast to varying
  # here, outside the custom_vjp, so that JAX sums its gradient over that axis.
  axes = varying_axes(values, indices, weights)
  values, indices, weights = (to_varying(a, axes) for a in (values, indices, weights))
  return _embedding_bag(values, indices.astype(jnp.int32), weights, resolve_impl(impl))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _row_dots(values_SV, idx_NK, x_NV, impl):
  # The bag backward's weight gradient is exactly these dots; its table gradient (zero weights)
  # is discarded, which is why this is for small tables.
  zeros_NK = to_varying(jnp.zeros(idx_NK.shape, jnp.float32), varying_axes(x_NV))
  _, dots_NK = kernels(impl).bag_backward(values_SV, idx_NK, zeros_NK, x_NV)
  return to_varying(dots_NK.astype(x_NV.dtype), varying_axes(values_SV))


def _row_dots_fwd(values_SV, idx_NK, x_NV, impl):
  return _row_dots(values_SV, idx_NK, x_NV, impl), (values_SV, idx_NK, x_NV)


def _row_dots_bwd(impl, residuals, dots_NK):
  values_SV, idx_NK, x_NV = residuals
  lookup = kernels(impl)
  dots_NK = dots_NK.astype(jnp.float32)
  dx_NV = lookup.bag_forward(values_SV, idx_NK, dots_NK)
  dvalues_SV, _ = lookup.bag_backward(values_SV, idx_NK, dots_NK, x_NV)
  axes = varying_axes(values_SV)
  return (
      to_varying(dvalues_SV.astype(values_SV.dtype), axes),
      None,
      to_varying(dx_NV.astype(x_NV.dtype), axes),
  )


_row_dots.defvjp(_row_dots_fwd, _row_dots_bwd)


def row_dots(values: jax.Array, indices: jax.Array, x: jax.Array, impl: str = "auto") -> jax.Array:
  """dots[t, k] = <x[t], values[indices[t, k]]>, (N, K) in x's dtype, through the embedding-bag
  kernels of `impl` (its weight gradient forward; the bag and its table gradient backward).

  The gradient reaches only the rows read; the backward writes a dense gradient of `values`,
  so this is meant for small tables (the memory's sub-keys), not the value table.
  """
  if values.ndim != 2 or indices.ndim != 2 or x.shape != (indices.shape[0], values.shape[1]):
    raise ValueError(
        "row_dots expects values (S, V), indices (N, K) and x (N, V); got "
        f"{values.shape}, {indices.shape} and {x.shape}"
    )
  axes = varying_axes(values, indices, x)
  values, indices, x = (to_varying(a, axes) for a in (values, indices, x))
  return _row_dots(values, indices.astype(jnp.int32), x, resolve_impl(impl))
