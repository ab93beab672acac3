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
import importlib
import warnings
from typing import Callable

import jax
import jax.numpy as jnp

# Bag positions handled per loop trip: enough to amortise the loop, few enough to keep each trip's
# gathered (tokens x dim) slab in cache.
_UNROLL = 8


def _varying_axes(*arrays: jax.Array) -> tuple[str, ...]:
  """The shard_map axes over which any of `arrays` varies (none outside shard_map)."""
  axes = set()
  for array in arrays:
    manual = getattr(jax.typeof(array), "manual_axis_type", None)
    axes |= set(manual.varying) if manual is not None else set()
  return tuple(sorted(axes))


def _to_varying(array: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  missing = tuple(a for a in axes if a not in _varying_axes(array))
  return jax.lax.pcast(array, missing, to="varying") if missing else array


def _zeros(shape: tuple[int, ...], *like: jax.Array) -> jax.Array:
  """float32 zeros varying like `like`, so that loop carries keep one type inside shard_map."""
  return _to_varying(jnp.zeros(shape, jnp.float32), _varying_axes(*like))


def bag_forward_xla(values_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array) -> jax.Array:
  n_tokens, bag = idx_NK.shape
  w_NK = w_NK.astype(jnp.float32)
  if bag == 0:
    return _zeros((n_tokens, values_SV.shape[1]), values_SV, idx_NK, w_NK)

  def add_position(k, acc_NV):
    rows_NV = jnp.take(values_SV, idx_NK[:, k], axis=0, mode="clip")
    return acc_NV + w_NK[:, k, None] * rows_NV.astype(jnp.float32)

  acc_NV = _zeros((n_tokens, values_SV.shape[1]), values_SV, idx_NK, w_NK)
  return jax.lax.fori_loop(0, bag, add_position, acc_NV, unroll=min(_UNROLL, max(bag, 1)))


def bag_backward_xla(
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
      _zeros(values_SV.shape, values_SV, idx_NK, w_NK, dout_NV),
      (idx_NK.T, w_NK.T),
      unroll=min(_UNROLL, max(bag, 1)),
  )
  return dvalues_SV, dw_KN.T


# name -> (forward, backward); kernels register themselves here.
_IMPLS: dict[str, tuple[Callable, Callable]] = {"xla": (bag_forward_xla, bag_backward_xla)}


def register_impl(name: str, forward: Callable, backward: Callable) -> None:
  """Adds an implementation with the forward/backward signatures of the `xla` one."""
  _IMPLS[name] = (forward, backward)


def available_impls() -> tuple[str, ...]:
  return tuple(sorted(_IMPLS))


# The impl "auto" picks per platform, and the modules that register kernels on first use.
_PLATFORM_IMPLS = {"cpu": "cpu", "tpu": "pallas_tpu", "gpu": "triton"}
_KERNEL_MODULES = {
    "cpu": "pallas_kernels.cpu",
    "pallas_tpu": "pallas_kernels.tpu",
    "triton": "pallas_kernels.gpu",
}
_load_failures: dict[str, Exception] = {}
_warned: set[str] = set()


def _load(impl: str) -> str | None:
  """Registers `impl` from its kernel module unless done; returns None, or why it cannot be."""
  if impl in _IMPLS:
    return None
  if impl not in _KERNEL_MODULES:
    return f"no kernels named {impl!r} in this build"
  if impl not in _load_failures:
    try:
      importlib.import_module(_KERNEL_MODULES[impl]).register()
      return None
    except (ImportError, RuntimeError) as error:
      _load_failures[impl] = error
  return str(_load_failures[impl])


def resolve_impl(impl: str) -> str:
  """Maps "auto" to the best implementation for the default backend; checks the name.

  "auto" falls back to `xla` when the platform's kernels cannot be loaded (for example, no C++
  compiler for the `cpu` kernels); asking for those kernels by name raises with the reason.
  """
  if impl == "auto":
    preferred = _PLATFORM_IMPLS.get(jax.default_backend(), "xla")
    reason = _load(preferred)
    if reason is None:
      return preferred
    deliberate = getattr(_load_failures.get(preferred), "deliberate", False)
    if preferred in _KERNEL_MODULES and not deliberate and preferred not in _warned:
      _warned.add(preferred)
      warnings.warn(f"memjax: the {preferred} lookup kernels are unavailable ({reason}); using the "
                    "slower xla impl", RuntimeWarning, stacklevel=2)
    return "xla"
  if impl in _KERNEL_MODULES and (reason := _load(impl)) is not None:
    raise ValueError(f"embedding_bag impl {impl!r} is not available: {reason}")
  if impl not in _IMPLS:
    raise ValueError(
        f"embedding_bag impl {impl!r} is not available; choose 'auto' or one of "
        f"{', '.join(available_impls())}"
    )
  return impl


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _embedding_bag(values_SV, idx_NK, w_NK, impl):
  forward, _ = _IMPLS[impl]
  out_NV = forward(values_SV, idx_NK, w_NK).astype(w_NK.dtype)
  # Kernels (custom calls) return arrays that shard_map sees as replicated; the result varies
  # like the inputs, which `embedding_bag` has made alike.
  return _to_varying(out_NV, _varying_axes(values_SV))


def _embedding_bag_fwd(values_SV, idx_NK, w_NK, impl):
  return _embedding_bag(values_SV, idx_NK, w_NK, impl), (values_SV, idx_NK, w_NK)


def _embedding_bag_bwd(impl, residuals, dout_NV):
  values_SV, idx_NK, w_NK = residuals
  _, backward = _IMPLS[impl]
  dvalues_SV, dw_NK = backward(values_SV, idx_NK, w_NK, dout_NV)
  axes = _varying_axes(values_SV)
  return (
      _to_varying(dvalues_SV.astype(values_SV.dtype), axes),
      None,
      _to_varying(dw_NK.astype(w_NK.dtype), axes),
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
  # Inside shard_map, a table replicated over an axis that the tokens vary over is cast to varying
  # here, outside the custom_vjp, so that JAX sums its gradient over that axis.
  axes = _varying_axes(values, indices, weights)
  values, indices, weights = (_to_varying(a, axes) for a in (values, indices, weights))
  return _embedding_bag(values, indices.astype(jnp.int32), weights, resolve_impl(impl))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _row_dots(values_SV, idx_NK, x_NV, impl):
  # The bag backward's weight gradient is exactly these dots; its table gradient (zero weights)
  # is discarded, which is why this is for small tables.
  _, backward = _IMPLS[impl]
  zeros_NK = _to_varying(jnp.zeros(idx_NK.shape, jnp.float32), _varying_axes(x_NV))
  _, dots_NK = backward(values_SV, idx_NK, zeros_NK, x_NV)
  return _to_varying(dots_NK.astype(x_NV.dtype), _varying_axes(values_SV))


def _row_dots_fwd(values_SV, idx_NK, x_NV, impl):
  return _row_dots(values_SV, idx_NK, x_NV, impl), (values_SV, idx_NK, x_NV)


def _row_dots_bwd(impl, residuals, dots_NK):
  values_SV, idx_NK, x_NV = residuals
  forward, backward = _IMPLS[impl]
  dots_NK = dots_NK.astype(jnp.float32)
  dx_NV = forward(values_SV, idx_NK, dots_NK)
  dvalues_SV, _ = backward(values_SV, idx_NK, dots_NK, x_NV)
  axes = _varying_axes(values_SV)
  return (
      _to_varying(dvalues_SV.astype(values_SV.dtype), axes),
      None,
      _to_varying(dx_NV.astype(x_NV.dtype), axes),
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
  axes = _varying_axes(values, indices, x)
  values, indices, x = (_to_varying(a, axes) for a in (values, indices, x))
  return _row_dots(values, indices.astype(jnp.int32), x, resolve_impl(impl))
