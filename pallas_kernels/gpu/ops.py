"""JAX entry points of the Triton kernels: launch plans, and their calls through jax-triton.

Each public function first builds a `Launch` (kernel, grid, operands, output shapes, constexprs),
then runs it with `jax_triton.triton_call`. The tests run the same launches under Triton's
interpreter on the CPU, so everything but jax-triton's own call is checked without a GPU.

Block sizes (keyword arguments, checked up front):
- forward: a program per (token, BLOCK_V columns); it loads BLOCK_K rows of its bag at a time.
- backward: a program per (BLOCK_R table rows, BLOCK_V columns); it loads BLOCK_J lookups of a
  row at a time. BLOCK_V defaults to the widest power of two whose slab of the output gradient,
  N x BLOCK_V, fits in about 24 MB, so the dOut rows that the programs in flight gather stay in
  L2 (50 MB on an H100, 60 MB on an H200); num_warps, to as many as give each thread 16 bytes of
  a row of dOut; BLOCK_J, to 4 where rows average at most 4 lookups, else 8.

Axis letters (see memjax): N tokens, K bag positions, S table rows, V row width, J flat lookups
(N*K), Y column blocks, B a vmapped batch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.gpu import kernels
from pallas_kernels.impls import bag_backward_xla, bag_forward_xla

# Table dtypes the kernels read as they are; others (float64 under x64) take the xla path.
_TABLE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_MAX_BLOCK_V = 1024
_DOUT_SLAB_BYTES = 24 << 20


@dataclasses.dataclass(frozen=True)
class Launch:
  """One kernel launch: operands are passed in order, then one pointer per output."""

  kernel: Any  # a @triton.jit function of `kernels`
  grid: tuple[int, ...]
  operands: tuple[jax.Array, ...]
  out_shapes: tuple[jax.ShapeDtypeStruct, ...]
  constexprs: dict[str, int]
  num_warps: int
  num_stages: int


def _pow2_at_least(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _check_block(name: str, value: int) -> None:
  if value < 1 or value & (value - 1):
    raise ValueError(f"{name} must be a positive power of two, got {value}")


def _default_block_v(dim: int) -> int:
  return min(_pow2_at_least(dim), _MAX_BLOCK_V)


def _warps_for_16_byte_loads(block_v: int, itemsize: int) -> int:
  """Warps that give each thread 16 bytes of a BLOCK_V row (1 to 8): the backward's programs
  are short and latency-bound, and the width a thread loads decides their time (the timed
  variants are in docs/results.md, GPU section)."""
  return max(1, min(8, block_v * itemsize // (16 * 32)))


def _native(x: jax.Array) -> jax.Array:
  """x as the kernels read it: float32, bfloat16 and float16 as they are (a narrow dOut is half
  the bytes to gather), anything else as float32."""
  return x if x.dtype in _TABLE_DTYPES else x.astype(jnp.float32)


def _supported(values_SV: jax.Array, idx_NK: jax.Array) -> bool:
  """The kernels handle these; the rest (empty shapes, float64 tables) go to the xla impl."""
  n_slots, dim = values_SV.shape
  return values_SV.dtype in _TABLE_DTYPES and min(n_slots, dim, idx_NK.size) > 0


def _check_sizes(idx_NK: jax.Array) -> None:
  if idx_NK.size >= 2**31:
    raise ValueError(f"the triton embedding bag needs tokens x bag < 2^31, got {idx_NK.shape}")


def forward_launch(
    values_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array, *,
    block_k: int | None = None, block_v: int | None = None, num_warps: int = 4, num_stages: int = 2,
) -> Launch:
  """The forward's launch: (S, V) table, (N, K) int32 ids and weights -> (N, V) in the weights'
  dtype (float32 for weights of other float types), summed in float32.

  Defaults: BLOCK_V the value dim rounded up to a power of two, at most 1024; BLOCK_K so that a
  tile of BLOCK_K x BLOCK_V holds about 8192 values (8 rows of 1024).
  """
  n_slots, dim = values_SV.shape
  n_tokens, bag = idx_NK.shape
  _check_sizes(idx_NK)
  block_v = _default_block_v(dim) if block_v is None else block_v
  block_k = min(_pow2_at_least(bag), max(4, 8192 // block_v)) if block_k is None else block_k
  _check_block("block_v", block_v)
  _check_block("block_k", block_k)
  w_NK = _native(w_NK)
  return Launch(
      kernel=kernels.bag_forward_kernel,
      grid=(n_tokens, -(-dim // block_v)),
      operands=(values_SV, idx_NK.astype(jnp.int32), w_NK),
      out_shapes=(jax.ShapeDtypeStruct((n_tokens, dim), w_NK.dtype),),
      constexprs=dict(N_SLOTS=n_slots, DIM=dim, BAG=bag, BLOCK_K=block_k, BLOCK_V=block_v),
      num_warps=num_warps,
      num_stages=num_stages,
  )


def sort_lookups(
    n_slots: int, idx_NK: jax.Array, w_NK: jax.Array, heavy_rows_first: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The backward's row-sorted view of the lookups, built with XLA ops.

  Returns (w_J, order_J, starts_S, rows_S): float32 weights per flat lookup t * K + k (zero where
  the id is out of range, so such lookups add nothing to the table gradient; they sit on the
  clamped row, whose values they read in the forward); the flat lookup ids sorted by row, stably
  (each row's sum runs in lookup order: deterministic); each row's first position in that order,
  then the end ((S + 1,)); and the order in which the programs visit rows: most-read first, so
  that the long programs of hot rows start early and overlap the rest (as the reference orders
  them), else 0..S-1.
  """
  in_range_NK = (idx_NK >= 0) & (idx_NK < n_slots)
  w_J = jnp.where(in_range_NK, w_NK.astype(jnp.float32), 0.0).reshape(-1)
  rows_J = jnp.clip(idx_NK, 0, n_slots - 1).astype(jnp.int32).reshape(-1)
  sorted_rows_J, order_J = jax.lax.sort(
      (rows_J, jax.lax.iota(jnp.int32, rows_J.size)), num_keys=1, is_stable=True
  )
  starts_S = jnp.searchsorted(
      sorted_rows_J, jnp.arange(n_slots + 1, dtype=jnp.int32), side="left"
  ).astype(jnp.int32)
  rows_S = jax.lax.iota(jnp.int32, n_slots)
  if heavy_rows_first:
    counts_S = starts_S[1:] - starts_S[:-1]
    _, rows_S = jax.lax.sort((-counts_S, rows_S), num_keys=1, is_stable=True)
  return w_J, order_J, starts_S, rows_S


def backward_launch(
    values_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array, dout_NV: jax.Array, *,
    block_r: int = 8, block_j: int | None = None, block_v: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 1, heavy_rows_first: bool = True,
) -> Launch:
  """The backward's launch (after `sort_lookups`): outputs the (S, V) table gradient in the
  table's dtype and (cdiv(V, BLOCK_V), N * K) float32 weight-gradient partials."""
  n_slots, dim = values_SV.shape
  n_tokens, bag = idx_NK.shape
  _check_sizes(idx_NK)
  dout_NV = _native(dout_NV)
  if block_v is None:
    block_v = _default_block_v(dim)
    while block_v > 64 and n_tokens * block_v * dout_NV.dtype.itemsize > _DOUT_SLAB_BYTES:
      block_v //= 2
  if num_warps is None:
    num_warps = _warps_for_16_byte_loads(block_v, dout_NV.dtype.itemsize)
  if block_j is None:
    # About a row's lookups at once (docs/results.md times both at the paper's shape).
    block_j = 4 if idx_NK.size <= 4 * n_slots else 8
  for name, value in (("block_r", block_r), ("block_j", block_j), ("block_v", block_v),
                      ("num_warps", num_warps)):
    _check_block(name, value)
  w_J, order_J, starts_S, rows_S = sort_lookups(n_slots, idx_NK, w_NK, heavy_rows_first)
  n_blocks = -(-dim // block_v)
  return Launch(
      kernel=kernels.bag_backward_kernel,
      grid=(-(-n_slots // block_r), n_blocks),
      operands=(values_SV, dout_NV, w_J, order_J, starts_S, rows_S),
      out_shapes=(
          jax.ShapeDtypeStruct(values_SV.shape, values_SV.dtype),
          jax.ShapeDtypeStruct((n_blocks, idx_NK.size), jnp.float32),
      ),
      constexprs=dict(
          N_SLOTS=n_slots, DIM=dim, BAG=bag, N_LOOKUPS=idx_NK.size,
          BLOCK_R=block_r, BLOCK_J=block_j, BLOCK_V=block_v,
      ),
      num_warps=num_warps,
      num_stages=num_stages,
  )


def weight_gradient(dw_partials_YJ: jax.Array, shape_NK: tuple[int, int]) -> jax.Array:
  """Sums the per-column-block partials of the weight gradient: (N, K) float32."""
  return jnp.sum(dw_partials_YJ, axis=0).reshape(shape_NK)


@functools.cache
def _triton_call():
  """jax_triton.triton_call, imported on first use (it needs a CUDA build of jax), and the name of
  its output-shape argument (`out_shape` up to jax-triton 0.3, `out_type` from 0.4)."""
  import jax_triton

  params = inspect.signature(jax_triton.triton_call).parameters
  return jax_triton.triton_call, "out_type" if "out_type" in params else "out_shape"


def run(launch: Launch, compute_capability: int | None = None) -> tuple[jax.Array, ...]:
  """Runs `launch` on the GPU through jax-triton; returns its outputs.

  compute_capability (e.g. 90 for Hopper) compiles for that GPU instead of the one present, so
  that a program can be lowered for CUDA where there is none.
  """
  triton_call, out_arg = _triton_call()
  outs = triton_call(
      *launch.operands,
      kernel=launch.kernel,
      grid=launch.grid,
      num_warps=launch.num_warps,
      num_stages=launch.num_stages,
      compute_capability=compute_capability,
      **{out_arg: launch.out_shapes},
      **launch.constexprs,
  )
  return tuple(outs)


def _broadcast(x: jax.Array, batched: bool, size: int) -> jax.Array:
  return x if batched else jnp.broadcast_to(x, (size, *x.shape))


@jax.custom_batching.custom_vmap
def bag_forward(values_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array) -> jax.Array:
  """The `triton` embedding-bag forward: (N, V) in the weights' dtype, summed in float32."""
  if not _supported(values_SV, idx_NK):
    return bag_forward_xla(values_SV, idx_NK, w_NK)
  (out_NV,) = run(forward_launch(values_SV, idx_NK, w_NK))
  return out_NV


@bag_forward.def_vmap
def _bag_forward_vmap(axis_size, in_batched, values_SV, idx_BNK, w_BNK):
  # jax-triton's call has no batching rule. One table for every batch entry: the batch is more
  # tokens. A batched table: one call per entry.
  values_batched, idx_batched, w_batched = in_batched
  idx_BNK = _broadcast(idx_BNK, idx_batched, axis_size)
  w_BNK = _broadcast(w_BNK, w_batched, axis_size)
  if not values_batched:
    _, n_tokens, bag = idx_BNK.shape
    out = bag_forward(values_SV, idx_BNK.reshape(-1, bag), w_BNK.reshape(-1, bag))
    return out.reshape(axis_size, n_tokens, -1), True
  return jax.lax.map(lambda args: bag_forward(*args), (values_SV, idx_BNK, w_BNK)), True


@jax.custom_batching.sequential_vmap
def bag_backward(
    values_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array, dout_NV: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The `triton` embedding-bag backward: the dense table gradient in the table's dtype (rows
  nobody read are zero) and the float32 weight gradient <dOut[t], V[idx[t, k]]>."""
  if not _supported(values_SV, idx_NK):
    return bag_backward_xla(values_SV, idx_NK, w_NK, dout_NV)
  dvalues_SV, dw_YJ = run(backward_launch(values_SV, idx_NK, w_NK, dout_NV))
  return dvalues_SV, weight_gradient(dw_YJ, idx_NK.shape)
