"""The lookup impls: the one table of them, and the protocol their kernel packages follow.

An impl is a kernel package plus one `Impl` entry in `IMPLS`. The package has a function
`load() -> Kernels` that returns its kernels, or raises `Unavailable` saying why they cannot run
here (no compiler, no GPU, turned off). memjax loads a package the first time its impl is asked
for (`memjax.ops.dispatch`); config validation, "auto", the benchmarks and the tests read this
table rather than spelling impl names.

This module imports no kernel package: the packages import it, for the `xla` twin below (the
reference their tests compare against, and the path they hand shapes and dtypes they do not
take) and for the shard_map helpers a kernel needs to return arrays of the right type.

Axis letters (see memjax): N tokens, K bag positions (or top-k), S table rows, V row width, R
selection rows, M sub-keys per half, U distinct rows.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

BagForward = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
BagBackward = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
TopK = Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]
ProductTopK = Callable[[jax.Array, jax.Array, int], tuple[jax.Array, jax.Array]]
SetRows = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]


class Unavailable(RuntimeError):
  """An impl's kernels cannot run here; the message says why.

  `deliberate` is True when the user turned them off, so that "auto" falls back without a warning.
  """

  def __init__(self, reason: str, *, deliberate: bool = False):
    super().__init__(reason)
    self.deliberate = deliberate


@dataclasses.dataclass(frozen=True)
class Kernels:
  """What a kernel package's `load()` returns.

  bag_forward(values_SV, idx_NK, w_NK) -> out_NV float32, and
  bag_backward(values_SV, idx_NK, w_NK, dout_NV) -> (dvalues_SV, dw_NK): the signatures and the
    results of `bag_forward_xla` and `bag_backward_xla` (the table gradient dense, duplicates
    summed, out-of-range ids skipped; float32 accumulation).
  top_k(x, k) -> (values, indices): `jax.lax.top_k`, ties to the lower index; None = that one.
  product_topk(scores1_RM, scores2_RM, k) -> (scores_RK, slots_RK): for float32 scores, the
    results of `memjax.ops.product_topk` in one call; None = its XLA steps with `top_k`.
  set_rows(table_SV, rows_U, new_UV, factor) -> table: `memjax.ops.set_rows` in place on one
    device; None = XLA's scatter.
  """

  bag_forward: BagForward
  bag_backward: BagBackward
  top_k: TopK | None = None
  product_topk: ProductTopK | None = None
  set_rows: SetRows | None = None


@dataclasses.dataclass(frozen=True)
class Impl:
  """One lookup impl.

  name: what `impl=` and the config's `model.memory.impl` say.
  package: the kernel package whose `load()` gives its `Kernels`.
  platform: the JAX platform its kernels are built for, where "auto" picks it; None for the
    `xla` twin, which runs on every platform.
  """

  name: str
  package: str
  platform: str | None = None


IMPLS: tuple[Impl, ...] = (
    Impl("xla", "pallas_kernels.xla"),
    Impl("cpu", "pallas_kernels.cpu", platform="cpu"),
    Impl("pallas_tpu", "pallas_kernels.tpu", platform="tpu"),
    Impl("triton", "pallas_kernels.gpu", platform="gpu"),
)
NAMES: tuple[str, ...] = tuple(impl.name for impl in IMPLS)


def named(name: str) -> Impl | None:
  return next((impl for impl in IMPLS if impl.name == name), None)


def for_platform(platform: str) -> Impl | None:
  """The impl "auto" prefers on `platform` ("cpu", "gpu", "tpu"), if the table has one."""
  return next((impl for impl in IMPLS if impl.platform == platform), None)


# ----------------------------------------------------------------------------------------------
# Inside shard_map, arrays carry the mesh axes they vary over; kernels (custom calls) return
# arrays typed as replicated, and loop carries must keep one type.


def varying_axes(*arrays: jax.Array) -> tuple[str, ...]:
  """The shard_map axes over which any of `arrays` varies (none outside shard_map)."""
  axes = set()
  for array in arrays:
    manual = getattr(jax.typeof(array), "manual_axis_type", None)
    axes |= set(manual.varying) if manual is not None else set()
  return tuple(sorted(axes))


def to_varying(array: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """`array` typed as varying over `axes` too."""
  missing = tuple(a for a in axes if a not in varying_axes(array))
  return jax.lax.pcast(array, missing, to="varying") if missing else array


def _zeros(shape: tuple[int, ...], *like: jax.Array) -> jax.Array:
  """float32 zeros varying like `like`."""
  return to_varying(jnp.zeros(shape, jnp.float32), varying_axes(*like))


# ----------------------------------------------------------------------------------------------
# The `xla` twin.

# Bag positions handled per loop trip: enough to amortise the loop, few enough to keep each trip's
# gathered (tokens x dim) slab in cache.
_UNROLL = 8


def bag_forward_xla(values_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array) -> jax.Array:
  """sum_k w[t, k] * V[idx[t, k]], (N, V) float32, one bag position per loop step (the gathered
  (N, K, V) rows are never held at once). Out-of-range ids read the clamped row."""
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
  """(dvalues_SV, dw_NK), both float32: the dense table gradient (duplicates summed, nothing
  for out-of-range ids) and <dOut[t], V[idx[t, k]]>."""
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
