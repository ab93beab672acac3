"""The memory read: a weighted embedding bag, out[t] = sum_k w[t, k] * V[idx[t, k]].

Every implementation honours one `jax.custom_vjp` contract:

- forward never materialises the gathered (tokens x bag x dim) rows;
- backward returns the dense table gradient (duplicate indices summed) and the per-weight
  gradient <dOut[t], V[idx[t, k]]>; indices get no gradient;
- the residuals are the primal inputs only (the table, indices and weights).

Accumulation is float32; the output has the weights' dtype, the table gradient the table's.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

# Bag positions handled per loop trip: enough to amortise the loop, few enough to keep each trip's
# gathered (tokens x dim) slab in cache.
_UNROLL = 8


def _bag_forward_xla(values_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array) -> jax.Array:
  n_tokens, bag = idx_NK.shape
  w_NK = w_NK.astype(jnp.float32)

  def add_position(k, acc_NV):
    rows_NV = jnp.take(values_SV, idx_NK[:, k], axis=0, mode="clip")
    return acc_NV + w_NK[:, k, None] * rows_NV.astype(jnp.float32)

  acc_NV = jnp.zeros((n_tokens, values_SV.shape[1]), jnp.float32)
  return jax.lax.fori_loop(0, bag, add_position, acc_NV, unroll=min(_UNROLL, max(bag, 1)))


def _bag_backward_xla(
    values_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array, dout_NV: jax.Array
) -> tuple[jax.Array, jax.Array]:
  n_slots = values_SV.shape[0]
  dout_NV = dout_NV.astype(jnp.float32)
  # Out-of-range ids scatter a zero update into a clipped row, so the scatter can skip its
  # bounds checks and such ids still receive no gradient.
  in_range_NK = (idx_NK >= 0) & (idx_NK < n_slots)
  w_NK = jnp.where(in_range_NK, w_NK.astype(jnp.float32), 0.0)
  idx_NK = jnp.clip(idx_NK, 0, n_slots - 1)

  def position(dvalues_SV, idx_w):
    idx_N, w_N = idx_w
    rows_NV = jnp.take(values_SV, idx_N, axis=0).astype(jnp.float32)
    dvalues_SV = dvalues_SV.at[idx_N].add(w_N[:, None] * dout_NV, mode="promise_in_bounds")
    return dvalues_SV, jnp.sum(rows_NV * dout_NV, axis=-1)

  bag = idx_NK.shape[1]
  dvalues_SV, dw_KN = jax.lax.scan(
      position,
      jnp.zeros(values_SV.shape, jnp.float32),
      (idx_NK.T, w_NK.T),
      unroll=min(_UNROLL, max(bag, 1)),
  )
  return dvalues_SV, dw_KN.T


# name -> (forward, backward); kernels register themselves here.
_IMPLS: dict[str, tuple[Callable, Callable]] = {"xla": (_bag_forward_xla, _bag_backward_xla)}


def register_impl(name: str, forward: Callable, backward: Callable) -> None:
  """Adds an implementation with the forward/backward signatures of the `xla` one."""
  _IMPLS[name] = (forward, backward)


def available_impls() -> tuple[str, ...]:
  return tuple(sorted(_IMPLS))


def resolve_impl(impl: str) -> str:
  """Maps "auto" to the best implementation for the default backend; checks the name."""
  if impl == "auto":
    preferred = {"tpu": "pallas_tpu", "gpu": "triton"}.get(jax.default_backend(), "xla")
    return preferred if preferred in _IMPLS else "xla"
  if impl not in _IMPLS:
    raise ValueError(
        f"embedding_bag impl {impl!r} is not available; choose 'auto' or one of "
        f"{', '.join(available_impls())}"
    )
  return impl


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _embedding_bag(values_SV, idx_NK, w_NK, impl):
  forward, _ = _IMPLS[impl]
  return forward(values_SV, idx_NK, w_NK).astype(w_NK.dtype)


def _embedding_bag_fwd(values_SV, idx_NK, w_NK, impl):
  return _embedding_bag(values_SV, idx_NK, w_NK, impl), (values_SV, idx_NK, w_NK)


def _embedding_bag_bwd(impl, residuals, dout_NV):
  values_SV, idx_NK, w_NK = residuals
  _, backward = _IMPLS[impl]
  dvalues_SV, dw_NK = backward(values_SV, idx_NK, w_NK, dout_NV)
  return dvalues_SV.astype(values_SV.dtype), None, dw_NK.astype(w_NK.dtype)


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
    impl: "auto" (by platform), or one of `available_impls()`.

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
  return _embedding_bag(values, indices.astype(jnp.int32), weights, resolve_impl(impl))
