"""JAX entry points of the CPU kernels (XLA FFI custom calls).

Axis letters (see memjax): N tokens, K bag positions (or top-k), S table rows, V row width, R
selection rows, M sub-keys per half, U distinct rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu import build
from pallas_kernels.impls import bag_backward_xla, bag_forward_xla

# Float types the kernels take as float32 without changing an order or a sum; wider ones
# (float64 under jax_enable_x64) go to the XLA path.
_NATIVE = (jnp.float32, jnp.bfloat16, jnp.float16)

_TARGETS = {
    "memjax_topk": "MemjaxTopK",
    "memjax_product_topk": "MemjaxProductTopK",
    "memjax_bag_fwd": "MemjaxBagForward",
    "memjax_bag_bwd": "MemjaxBagBackward",
    "memjax_set_rows": "MemjaxSetRows",
}


@functools.cache
def _register_targets() -> None:
  library = build.load()
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")


@functools.cache
def load_error() -> build.BuildError | None:
  """None when the kernels are built and registered, else the error (tried once per process)."""
  try:
    _register_targets()
  except build.BuildError as error:
    return error
  return None


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k` (same values, indices and tie order) for float inputs, multi-threaded.

  Gradients flow to the selected entries of `x`, as with `lax.top_k`.
  """
  _register_targets()
  if not 1 <= k <= x.shape[-1]:
    raise ValueError(f"top_k needs 1 <= k <= {x.shape[-1]}, got k={k}")
  if x.dtype not in _NATIVE:
    return jax.lax.top_k(x, k)
  # float32 keeps the order of every narrower float; the indices carry no gradient.
  keys = jax.lax.stop_gradient(x).astype(jnp.float32)
  idx = jax.ffi.ffi_call(
      "memjax_topk",
      jax.ShapeDtypeStruct(x.shape[:-1] + (k,), jnp.int32),
      vmap_method="broadcast_all",
  )(keys, k=np.int64(k))
  return jnp.take_along_axis(x, idx, axis=-1), idx


def product_topk(
    scores1_RM: jax.Array, scores2_RM: jax.Array, knn: int
) -> tuple[jax.Array, jax.Array]:
  """`memjax.ops.product_topk` for float32 scores in one custom call: (scores, slots) (R, knn).

  The kernel returns each winner's position in both halves; the scores are gathered and summed
  here, so they carry gradients and equal the grid sums of the XLA path bit for bit.
  """
  _register_targets()
  n_keys = scores1_RM.shape[-1]
  if not 1 <= knn <= n_keys:
    raise ValueError(f"product_topk needs 1 <= knn <= {n_keys}, got knn={knn}")
  out = jax.ShapeDtypeStruct(scores1_RM.shape[:-1] + (knn,), jnp.int32)
  i1_RK, i2_RK = jax.ffi.ffi_call("memjax_product_topk", (out, out), vmap_method="broadcast_all")(
      jax.lax.stop_gradient(scores1_RM), jax.lax.stop_gradient(scores2_RM), k=np.int64(knn)
  )
  scores_RK = (
      jnp.take_along_axis(scores1_RM, i1_RK, axis=-1)
      + jnp.take_along_axis(scores2_RM, i2_RK, axis=-1)
  )
  return scores_RK, i1_RK * n_keys + i2_RK


def _native(*arrays: jax.Array) -> bool:
  return all(a.dtype in _NATIVE for a in arrays)


def _table(values_SV: jax.Array) -> jax.Array:
  return values_SV if values_SV.dtype in (jnp.float32, jnp.bfloat16) else values_SV.astype(jnp.float32)


def bag_forward(values_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array) -> jax.Array:
  """The `cpu` embedding-bag forward: (N, V) float32."""
  _register_targets()
  if not _native(values_SV, w_NK):
    return bag_forward_xla(values_SV, idx_NK, w_NK)
  n_tokens, dim = idx_NK.shape[0], values_SV.shape[1]
  return jax.ffi.ffi_call(
      "memjax_bag_fwd",
      jax.ShapeDtypeStruct((n_tokens, dim), jnp.float32),
      vmap_method="sequential",
  )(_table(values_SV), idx_NK.astype(jnp.int32), w_NK.astype(jnp.float32))


def bag_backward(
    values_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array, dout_NV: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The `cpu` embedding-bag backward: dense float32 table gradient and float32 weight gradient."""
  _register_targets()
  if not _native(values_SV, w_NK, dout_NV):
    return bag_backward_xla(values_SV, idx_NK, w_NK, dout_NV)
  return jax.ffi.ffi_call(
      "memjax_bag_bwd",
      (
          jax.ShapeDtypeStruct(values_SV.shape, jnp.float32),
          jax.ShapeDtypeStruct(idx_NK.shape, jnp.float32),
      ),
      vmap_method="sequential",
  )(
      _table(values_SV),
      idx_NK.astype(jnp.int32),
      w_NK.astype(jnp.float32),
      dout_NV.astype(jnp.float32),
  )


def set_rows(
    table_SV: jax.Array, rows_U: jax.Array, new_UV: jax.Array, factor: jax.Array | None = None
) -> jax.Array:
  """`(factor * table_SV).at[rows_U].set(new_UV, mode="drop")` in place for distinct `rows_U`:
  any dtype without a factor, float32 with one. XLA:CPU would scatter into a 16-bit table
  through a float32 copy of all of it, and copy a table scaled by a fused pass first."""
  _register_targets()
  if factor is not None and table_SV.dtype != jnp.float32:
    raise ValueError(f"set_rows: a factor needs a float32 table, got {table_SV.dtype}")
  factor = jnp.float32(1) if factor is None else jnp.asarray(factor, jnp.float32)
  return jax.ffi.ffi_call(
      "memjax_set_rows", jax.ShapeDtypeStruct(table_SV.shape, table_SV.dtype),
      input_output_aliases={0: 0},
  )(table_SV, factor, rows_U.astype(jnp.int32), new_UV.astype(table_SV.dtype))
