"""Pallas TPU kernels for the weighted embedding bag and its two gradients.

Design note.

The table (S, V) is far larger than VMEM, and a bag reads K scattered rows per token, so the table
stays in HBM (`pl.ANY`) and each needed row is copied by its own DMA (a bfloat16 table's rows in
pairs, see "Row copies" below); nothing else reads it. Every
kernel's grid runs over blocks of the work (tokens or table rows) and column tiles of width
`block_dim` (a multiple of 128 lanes, or all of V).

- `gather_bag` (forward) and `gather_dot` (weight gradient) share one copy pattern. A grid step owns
  `block_tokens` tokens. Their indices arrive in SMEM as an auto-pipelined (block_tokens, K) block:
  the whole (N, K) array (4 MiB at 8192 x 128) would not fit SMEM, a block of it does. The step
  copies each token's K rows into one slot of a VMEM ring of `tokens_in_flight` + 1 slots (K_pad x
  block_dim each), `tokens_in_flight` tokens ahead of the token being reduced, so `tokens_in_flight`
  x K row copies are in flight while the vector and matrix units work. All K copies of a slot signal
  that slot's DMA semaphore. The reduction is one matrix product per token on the MXU (two for
  bfloat16: the pairs' even and odd rows) with float32 accumulation: (1, K_pad) weights x (K_pad,
  block_dim) rows for the forward, (1, block_dim) dOut x (K_pad, block_dim)^T for the weight
  gradient. K is padded to a multiple of 128 lanes; the padded rows of the ring are zeroed each step
  and never copied.
- `sorted_row_grad` (table gradient) needs no atomics: outside the kernel, JAX sorts the
  (row, token) pairs by row (a stable sort, so the order of every sum is fixed) and finds where
  each block of `block_rows` table rows starts in that order. A grid step owns one block of the
  gradient; its two bounds arrive in SMEM within an (8, 2) block of a (blocks, 2) array (8: the
  sublane tiling Mosaic asks of any block), so SMEM holds the same few words whatever the table's
  size (a scalar-prefetched array of every block's start
  would outgrow SMEM's 1 MiB at 2^28 rows in blocks of 256). The step accumulates it in a float32 VMEM tile and writes it once
  (untouched rows are zero), and walks its entries in chunks of `chunk` (aligned to the chunk
  grid, so the sorted arrays can be copied in whole tiles). Per chunk it copies the tokens to
  SMEM and the rows and weights to VMEM, then copies the chunk's dOut rows from HBM, and adds
  onehot(row) * w (block_rows x chunk) @ dOut rows (chunk x block_dim) on the MXU. Entries of the
  chunk that belong to a neighbouring block match no row of the one-hot and add nothing. Two
  chunk buffers alternate: the next chunk's dOut rows are in flight while the current one is
  summed, and the chunk after that's tokens while both are.

Products run at `Precision.HIGHEST` (float32 through the bf16 MXU passes), so a float32 table
gives float32 results, and a bfloat16 table's rows enter exactly.

Default blocks: 32 tokens a step with about 1 MiB of row copies in flight (2 tokens' at K = 128,
V = 1024; 16 tokens' at V = 128), all of V up to 2048 lanes a step (1024 for the table
gradient), 256 gradient rows a step and chunks of 128 entries. At V = 1024 that is 1.5 MiB of VMEM
ring for the forward (1.1 MiB at V = 128) and 3 MiB for the table gradient, inside every
generation's default scoped VMEM. The in-flight target is HBM's bandwidth-delay product, reasoned,
not measured: no TPU has run these kernels.

Each entry point takes `interpret`: Mosaic by default, or one of Pallas's interpreters on any
backend. `ops.py` picks by the platform it lowers for.

Axis letters (see memjax): N tokens, K bag positions, S table rows, V row width, J flat lookups
(the N*K (row, token) entries), Y chunks or row blocks, 1 a unit axis, 2 a pair.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
_BOUNDS_ROWS = 8  # grid steps whose row-block bounds share one SMEM block
_TABLE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_HIGHEST = jax.lax.Precision.HIGHEST


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _check_block_dim(dim: int, block_dim: int | None, cap: int) -> int:
  """The column tile: all of `dim` up to `cap` lanes, else the widest 128-multiple dividing it."""
  if block_dim is None:
    if dim <= cap:
      return dim
    if dim % LANES:
      return dim
    block_dim = max(b for b in range(LANES, cap + 1, LANES) if dim % b == 0)
  if dim % block_dim or (block_dim != dim and block_dim % LANES):
    raise ValueError(
        f"block_dim must divide the value dim {dim} and be a multiple of {LANES} (or all of it), "
        f"got {block_dim}"
    )
  return block_dim


def _check_positive(**kwargs: int) -> None:
  for name, value in kwargs.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")


def _out_shape(shape, dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
  """An output varying over the shard_map axes that `like` varies over (none outside one)."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def _check_table(values_SV: jax.Array) -> None:
  if values_SV.ndim != 2 or values_SV.dtype not in _TABLE_DTYPES:
    raise TypeError(
        f"the table must be (S, V) float32 or bfloat16, got {values_SV.shape} {values_SV.dtype}"
    )


# ---------------------------------------------------------------------------------------------
# Row copies shared by the forward and the weight gradient.
#
# A DMA moves whole 32-bit words, and a bfloat16 table's (16, 128) tiles pack rows 2i and 2i + 1
# into one word per column, so no copy can address a single bfloat16 row. Such a table is read
# through a uint32 view of shape (S / 2, V), one row pair per copy (twice the bytes of the row),
# and the wanted half of each word is widened to float32 by a shift or a mask: the even row is
# the low half (`pltpu.bitcast`'s order). The weights are split by row parity outside the kernel,
# so the even and odd halves are summed by two products and the other half meets zero weights.


def _row_copy(table_hbm, rows_vmem, sems, word_row, slot, j, col0):
  """One table row's column tile (a row pair for bfloat16), HBM -> position j of ring `slot`."""
  block_dim = rows_vmem.shape[-1]
  return pltpu.make_async_copy(
      table_hbm.at[pl.ds(word_row, 1), pl.ds(col0, block_dim)],
      rows_vmem.at[slot, pl.ds(j, 1)],
      sems.at[slot],
  )


def _halves(words_KV):
  """A uint32 tile of bfloat16 row pairs -> the even rows and the odd rows, as float32."""
  even = pltpu.bitcast(jax.lax.shift_left(words_KV, jnp.uint32(16)), jnp.float32)
  odd = pltpu.bitcast(words_KV & jnp.uint32(0xFFFF0000), jnp.float32)
  return even, odd


def _gather_rows_per_token(table_hbm, idx_smem, rows_vmem, sems, *, bag, packed, lookahead,
                           reduce):
  """For each token t of the block: its `bag` rows land in a ring slot, then `reduce(t, slot)`.

  Token t + lookahead's copies are issued before token t is reduced, so that many tokens' row
  copies overlap each reduction. (Integer ops here avoid `//` and `%`, whose lowering asks for
  the chip's version, which an ahead-of-time compile on a host without TPUs cannot give.)
  """
  n_tokens = idx_smem.shape[0]
  n_slots = rows_vmem.shape[0]
  col0 = pl.multiple_of(pl.program_id(1) * rows_vmem.shape[-1], rows_vmem.shape[-1])

  def start(t):
    slot = jax.lax.rem(t, n_slots)

    def one(j, carry):
      row = idx_smem[t, j]
      word_row = jax.lax.shift_right_logical(row, 1) if packed else row
      _row_copy(table_hbm, rows_vmem, sems, word_row, slot, j, col0).start()
      return carry

    jax.lax.fori_loop(0, bag, one, 0, unroll=min(bag, 8))

  def wait(t):
    slot = jax.lax.rem(t, n_slots)

    def one(j, carry):
      # Every copy into a slot has the same size; a wait needs only the size and semaphore.
      _row_copy(table_hbm, rows_vmem, sems, 0, slot, 0, col0).wait()
      return carry

    jax.lax.fori_loop(0, bag, one, 0, unroll=min(bag, 8))

  pad = rows_vmem.shape[1] - bag
  if pad:  # zero rows meet zero weights in the products; uninitialised VMEM might hold NaNs
    rows_vmem[:, bag:, :] = jnp.zeros((n_slots, pad, rows_vmem.shape[-1]), rows_vmem.dtype)

  for t in range(min(lookahead, n_tokens)):
    start(t)

  def token(t, carry):
    wait(t)

    @pl.when(t + lookahead < n_tokens)
    def _():
      start(t + lookahead)

    reduce(t, jax.lax.rem(t, n_slots))
    return carry

  jax.lax.fori_loop(0, n_tokens, token, 0)


# Bytes of row copies to keep in flight when `tokens_in_flight` is not given: about HBM's
# bandwidth-delay product (~1 TB/s x ~1 us), so that the copies' latency hides behind each other.
_IN_FLIGHT_BYTES = 1 << 20


def _token_grid(values_SV, idx_NK, block_tokens, block_dim, tokens_in_flight):
  """The table (uint32 row pairs if bfloat16), padded ids, their parities, the grid, the ring."""
  n_slots, dim = values_SV.shape
  n_tokens, bag = idx_NK.shape
  _check_table(values_SV)
  _check_positive(block_tokens=block_tokens)
  if block_tokens % 8:
    raise ValueError(f"block_tokens must be a multiple of 8 (sublanes), got {block_tokens}")
  block_dim = _check_block_dim(dim, block_dim, cap=2048)
  bag_pad = _round_up(bag, LANES)
  if tokens_in_flight is None:
    tokens_in_flight = max(2, min(block_tokens, -(-_IN_FLIGHT_BYTES // (bag_pad * block_dim * 4))))
  _check_positive(tokens_in_flight=tokens_in_flight)
  tokens_pad = _round_up(n_tokens, block_tokens)
  # Clamped ids: the op's contract (out-of-range reads the edge row), and no DMA outside the table.
  idx_NK = jnp.clip(idx_NK.astype(jnp.int32), 0, n_slots - 1)
  idx_NK = jnp.pad(idx_NK, ((0, tokens_pad - n_tokens), (0, bag_pad - bag)))
  packed = values_SV.dtype == jnp.bfloat16
  if packed and n_slots % 2:  # only tables with an odd row count pay this copy
    values_SV = jnp.pad(values_SV, ((0, 1), (0, 0)))
  odd_NK = (idx_NK & 1).astype(jnp.float32) if packed else None
  word_dtype = jnp.uint32 if packed else values_SV.dtype
  grid = (tokens_pad // block_tokens, dim // block_dim)
  ring = pltpu.VMEM((tokens_in_flight + 1, bag_pad, block_dim), word_dtype)
  sems = pltpu.SemaphoreType.DMA((tokens_in_flight + 1,))
  return (values_SV, idx_NK, odd_NK, grid, block_dim, bag_pad, tokens_pad, tokens_in_flight,
          [ring, sems])


def _token_cost(tokens_pad, bag, bag_pad, dim):
  # A float32 row or a bfloat16 row pair: 4 bytes a column per copy.
  copied = tokens_pad * bag * dim * 4
  return pl.CostEstimate(
      flops=2 * tokens_pad * bag * dim,
      transcendentals=0,
      bytes_accessed=copied + tokens_pad * (3 * bag_pad * 4 + dim * 4),
  )


def _packed_table(values_SV, packed, interpret):
  """What the kernel is given: the table, or in interpret mode its uint32 view made by XLA (the
  interpreter cannot bitcast an HBM ref; Mosaic does it in place, see `_table_ref`)."""
  if not (packed and interpret):
    return values_SV
  pairs_SV2 = jnp.swapaxes(values_SV.reshape(-1, 2, values_SV.shape[1]), 1, 2)
  return jax.lax.bitcast_convert_type(pairs_SV2, jnp.uint32)  # element 0 (even row): low half


def _table_ref(values_hbm, packed):
  if packed and values_hbm.dtype == jnp.bfloat16:
    return values_hbm.bitcast(jnp.uint32)
  return values_hbm


# ---------------------------------------------------------------------------------------------
# Forward.


def gather_bag(
    values_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array, *, block_tokens: int = 32,
    block_dim: int | None = None, tokens_in_flight: int | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
  """out[t] = sum_k w[t, k] * values[idx[t, k]], float32.

  Args:
    values_SV: (S, V) float32 or bfloat16 table; stays in HBM (pl.ANY), read one row tile per DMA
      (a bfloat16 row pair, see above).
    idx_NK: (N, K) integer ids; clamped to [0, S); SMEM, (block_tokens, K_pad) per grid step.
    w_NK: (N, K) float weights; VMEM as float32, (block_tokens, K_pad) per step (two such
      blocks, the even and odd rows' weights, for bfloat16).
    block_tokens: tokens per grid step (a multiple of 8).
    block_dim: columns per grid step (divides V; a multiple of 128 or V); default all of V up to
      2048 lanes.
    tokens_in_flight: tokens whose K row copies run ahead of the one being summed; the VMEM ring
      holds tokens_in_flight + 1 slots of (K_pad, block_dim) rows (float32 or uint32 pairs).
      Default: enough for about 1 MiB of copies in flight (2 tokens at K = 128, V = 1024; 16 at
      V = 128), at least 2 and at most block_tokens.
    interpret: instead of compiling with Mosaic, run on any backend in Pallas's interpret mode:
      True for the plain one (the kernel's copies and sums as XLA ops), or
      `pltpu.InterpretParams()` for the TPU one (simulated DMAs, semaphores, bounds checks).

  Returns:
    (N, V) float32.
  """
  n_tokens, bag = idx_NK.shape
  dim = values_SV.shape[1]
  packed = values_SV.dtype == jnp.bfloat16
  values_SV, idx_NK, odd_NK, grid, block_dim, bag_pad, tokens_pad, tokens_in_flight, scratch = (
      _token_grid(values_SV, idx_NK, block_tokens, block_dim, tokens_in_flight))
  w_NK = jnp.pad(w_NK.astype(jnp.float32), ((0, tokens_pad - n_tokens), (0, bag_pad - bag)))
  # bfloat16: the even rows' weights and the odd rows' weights; float32: the weights twice, unused.
  w_pair = (w_NK * (1.0 - odd_NK), w_NK * odd_NK) if packed else (w_NK, w_NK)

  def kernel(idx_smem, w_even_vmem, w_odd_vmem, values_hbm, out_vmem, rows_vmem, sems):
    def dot(w_1K, rows_KV):
      return jnp.dot(w_1K, rows_KV, precision=_HIGHEST, preferred_element_type=jnp.float32)

    def reduce(t, slot):
      if packed:
        even_KV, odd_KV = _halves(rows_vmem[slot])
        out_1V = (dot(w_even_vmem[pl.ds(t, 1), :], even_KV)
                  + dot(w_odd_vmem[pl.ds(t, 1), :], odd_KV))
      else:
        out_1V = dot(w_even_vmem[pl.ds(t, 1), :], rows_vmem[slot])
      out_vmem[pl.ds(t, 1), :] = out_1V

    _gather_rows_per_token(_table_ref(values_hbm, packed), idx_smem, rows_vmem, sems, bag=bag,
                           packed=packed, lookahead=tokens_in_flight, reduce=reduce)

  token_block = pl.BlockSpec((block_tokens, bag_pad), lambda i, c: (i, 0))
  out = pl.pallas_call(
      kernel,
      out_shape=_out_shape((tokens_pad, dim), jnp.float32, idx_NK),
      grid=grid,
      in_specs=[
          pl.BlockSpec((block_tokens, bag_pad), lambda i, c: (i, 0), memory_space=pltpu.SMEM),
          token_block,
          token_block,
          pl.BlockSpec(memory_space=pl.ANY),
      ],
      out_specs=pl.BlockSpec((block_tokens, block_dim), lambda i, c: (i, c)),
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      cost_estimate=_token_cost(tokens_pad, bag, bag_pad, dim),
      interpret=interpret,
      name="memjax_gather_bag",
  )(idx_NK, *w_pair, _packed_table(values_SV, packed, interpret))
  return out[:n_tokens]


# ---------------------------------------------------------------------------------------------
# Weight gradient.


def gather_dot(
    values_SV: jax.Array, idx_NK: jax.Array, dout_NV: jax.Array, *, block_tokens: int = 32,
    block_dim: int | None = None, tokens_in_flight: int | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
  """dw[t, k] = <dout[t], values[idx[t, k]]>, float32: the forward's copies, a dot instead of a sum.

  Args:
    values_SV: (S, V) float32 or bfloat16 table in HBM (pl.ANY).
    idx_NK: (N, K) integer ids, clamped to [0, S); SMEM, (block_tokens, K_pad) per grid step
      (and, for bfloat16, their parities in VMEM, to pick each row's half of its pair).
    dout_NV: (N, V) output cotangent; VMEM as float32, (block_tokens, block_dim) per step.
    block_tokens, block_dim, tokens_in_flight, interpret: as for `gather_bag`. Column tiles are
      the grid's inner ("arbitrary") axis: their partial dots add up in the resident output block.

  Returns:
    (N, K) float32.
  """
  n_tokens, bag = idx_NK.shape
  dim = values_SV.shape[1]
  packed = values_SV.dtype == jnp.bfloat16
  values_SV, idx_NK, odd_NK, grid, block_dim, bag_pad, tokens_pad, tokens_in_flight, scratch = (
      _token_grid(values_SV, idx_NK, block_tokens, block_dim, tokens_in_flight))
  dout_NV = jnp.pad(dout_NV.astype(jnp.float32), ((0, tokens_pad - n_tokens), (0, 0)))
  if not packed:
    odd_NK = jnp.zeros_like(idx_NK, jnp.float32)  # unused

  def kernel(idx_smem, odd_vmem, dout_vmem, values_hbm, dw_vmem, rows_vmem, sems):
    @pl.when(pl.program_id(1) == 0)
    def _():
      dw_vmem[...] = jnp.zeros_like(dw_vmem)

    def dot(dout_1V, rows_KV):
      return jax.lax.dot_general(dout_1V, rows_KV, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                                 preferred_element_type=jnp.float32)

    def reduce(t, slot):
      dout_1V = dout_vmem[pl.ds(t, 1), :]
      if packed:
        even_KV, odd_KV = _halves(rows_vmem[slot])
        dw_1K = jnp.where(odd_vmem[pl.ds(t, 1), :] > 0, dot(dout_1V, odd_KV),
                          dot(dout_1V, even_KV))
      else:
        dw_1K = dot(dout_1V, rows_vmem[slot])
      dw_vmem[pl.ds(t, 1), :] += dw_1K

    _gather_rows_per_token(_table_ref(values_hbm, packed), idx_smem, rows_vmem, sems, bag=bag,
                           packed=packed, lookahead=tokens_in_flight, reduce=reduce)

  dw = pl.pallas_call(
      kernel,
      out_shape=_out_shape((tokens_pad, bag_pad), jnp.float32, idx_NK),
      grid=grid,
      in_specs=[
          pl.BlockSpec((block_tokens, bag_pad), lambda i, c: (i, 0), memory_space=pltpu.SMEM),
          pl.BlockSpec((block_tokens, bag_pad), lambda i, c: (i, 0)),
          pl.BlockSpec((block_tokens, block_dim), lambda i, c: (i, c)),
          pl.BlockSpec(memory_space=pl.ANY),
      ],
      out_specs=pl.BlockSpec((block_tokens, bag_pad), lambda i, c: (i, 0)),
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      cost_estimate=_token_cost(tokens_pad, bag, bag_pad, dim),
      interpret=interpret,
      name="memjax_gather_dot",
  )(idx_NK, odd_NK, dout_NV, _packed_table(values_SV, packed, interpret))
  return dw[:n_tokens, :bag]


# ---------------------------------------------------------------------------------------------
# Table gradient.


def sort_by_row(idx_NK: jax.Array, w_NK: jax.Array, n_slots: int, *, block_rows: int, chunk: int):
  """The (row, token, weight) triples in row order, and where each block of rows starts.

  Out-of-range ids get the row `n_slots`, past every block (no gradient). The sort is stable, so
  each row's terms are summed in token order, run after run. Returns rows, tokens and weights as
  (Y, chunk) arrays (padded with row n_slots, token 0, weight 0) and the
  (ceil(S / block_rows) + 1,) block starts.
  """
  n_tokens, bag = idx_NK.shape
  rows_J = idx_NK.astype(jnp.int32).reshape(-1)
  rows_J = jnp.where((rows_J >= 0) & (rows_J < n_slots), rows_J, n_slots)
  rows_J, pos_J = jax.lax.sort((rows_J, jnp.arange(n_tokens * bag, dtype=jnp.int32)),
                               num_keys=1, is_stable=True)
  tok_J = pos_J // bag
  w_J = w_NK.astype(jnp.float32).reshape(-1)[pos_J]
  n_blocks = -(-n_slots // block_rows)
  bounds = jnp.minimum(jnp.arange(n_blocks + 1, dtype=jnp.int32) * block_rows, n_slots)
  starts = jnp.searchsorted(rows_J, bounds, side="left").astype(jnp.int32)
  pad = _round_up(max(rows_J.size, 1), chunk) - rows_J.size
  shape = (-1, chunk)
  return (
      jnp.pad(rows_J, (0, pad), constant_values=n_slots).reshape(shape),
      jnp.pad(tok_J, (0, pad)).reshape(shape),
      jnp.pad(w_J, (0, pad)).reshape(shape),
      starts,
  )


def table_grad(
    idx_NK: jax.Array, w_NK: jax.Array, dout_NV: jax.Array, n_slots: int, dtype, *,
    block_rows: int = 256, chunk: int = 128, block_dim: int | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
  """dvalues[s] = sum over (t, k) with idx[t, k] == s of w[t, k] * dout[t]: `sort_by_row` in
  XLA, then the `sorted_row_grad` kernel. Arguments as theirs; returns (S, V) in `dtype`."""
  _check_positive(block_rows=block_rows, chunk=chunk)
  if chunk % LANES:
    raise ValueError(f"chunk must be a multiple of {LANES}, got {chunk}")
  if block_rows % 16:
    raise ValueError(f"block_rows must be a multiple of 16 (bfloat16 sublanes), got {block_rows}")
  block_rows = min(block_rows, n_slots)
  rows_YJ, tok_YJ, w_YJ, starts = sort_by_row(idx_NK, w_NK, n_slots, block_rows=block_rows,
                                              chunk=chunk)
  return sorted_row_grad(rows_YJ, tok_YJ, w_YJ, starts, dout_NV, n_slots, dtype,
                         block_rows=block_rows, block_dim=block_dim, interpret=interpret)


def sorted_row_grad(
    rows_YJ: jax.Array, tok_YJ: jax.Array, w_YJ: jax.Array, starts: jax.Array,
    dout_NV: jax.Array, n_slots: int, dtype, *, block_rows: int, block_dim: int | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
  """The table gradient from `sort_by_row`'s output; every row of it written once.

  Args:
    rows_YJ, tok_YJ, w_YJ: (Y, chunk) int32 rows, int32 tokens and float32 weights of the
      entries in row order; stay in HBM (pl.ANY) and are copied a chunk (a multiple of 128) at a
      time: tokens to SMEM, rows and weights to VMEM, two rounds of each.
    starts: (ceil(S / block_rows) + 1,) int32 block starts; each grid step gets its block's two
      bounds in SMEM.
    dout_NV: (N, V) output cotangent; stays in HBM (pl.ANY) as float32, one row tile per DMA,
      two VMEM buffers of (chunk, block_dim).
    n_slots: S, the table's rows; the last block may be partial.
    dtype: the gradient's dtype (the table's): float32 or bfloat16.
    block_rows: gradient rows per grid step (a multiple of 16, or S), as given to `sort_by_row`;
      their float32 (block_rows, block_dim) sum lives in VMEM.
    block_dim: columns per grid step, as for `gather_bag` (default all of V up to 1024).
    interpret: as for `gather_bag`.

  Returns:
    (S, V) in `dtype`.
  """
  chunk = rows_YJ.shape[1]
  dim = dout_NV.shape[1]
  if jnp.dtype(dtype) not in _TABLE_DTYPES:
    raise TypeError(f"the gradient dtype must be float32 or bfloat16, got {dtype}")
  if starts.shape != (-(-n_slots // block_rows) + 1,):
    raise ValueError(f"starts {starts.shape} do not match {n_slots} rows in blocks of {block_rows}")
  block_dim = _check_block_dim(dim, block_dim, cap=1024)
  dout_NV = dout_NV.astype(jnp.float32)
  n_entries = rows_YJ.size

  def kernel(bounds_smem, rows_hbm, tok_hbm, w_hbm, dout_hbm, dv_vmem,
             acc_vmem, tok_smem, rows_vmem, w_vmem, dout_vmem, meta_sems, dout_sems):
    b = pl.program_id(0)
    col0 = pl.multiple_of(pl.program_id(1) * block_dim, block_dim)
    within = jax.lax.rem(b, _BOUNDS_ROWS)  # non-negative: no `%` (see _gather_rows_per_token)
    begin, end = bounds_smem[within, 0], bounds_smem[within, 1]
    first = jax.lax.div(begin, chunk)  # non-negative: no `//` (see _gather_rows_per_token)
    n_chunks = jnp.where(end > begin, jax.lax.div(end + chunk - 1, chunk) - first, 0)
    row0 = b * block_rows

    def meta_copies(c, slot):
      return [
          pltpu.make_async_copy(src.at[pl.ds(c, 1)], dst.at[slot], meta_sems.at[i, slot])
          for i, (src, dst) in enumerate(((tok_hbm, tok_smem), (rows_hbm, rows_vmem),
                                           (w_hbm, w_vmem)))
      ]

    def dout_copy(token, slot, e):
      return pltpu.make_async_copy(
          dout_hbm.at[pl.ds(token, 1), pl.ds(col0, block_dim)],
          dout_vmem.at[slot, pl.ds(e, 1)],
          dout_sems.at[slot],
      )

    def start_douts(slot):
      def one(e, carry):
        dout_copy(tok_smem[slot, 0, e], slot, e).start()
        return carry
      jax.lax.fori_loop(0, chunk, one, 0, unroll=8)

    def wait_douts(slot):
      def one(e, carry):
        dout_copy(0, slot, 0).wait()
        return carry
      jax.lax.fori_loop(0, chunk, one, 0, unroll=8)

    acc_vmem[...] = jnp.zeros_like(acc_vmem)

    @pl.when(n_chunks > 0)
    def _():
      for copy in meta_copies(first, 0):
        copy.start()
      for copy in meta_copies(first, 0):
        copy.wait()
      start_douts(0)

      @pl.when(n_chunks > 1)
      def _():
        for copy in meta_copies(first + 1, 1):
          copy.start()

      def step(k, carry):
        slot = jax.lax.rem(k, 2)
        wait_douts(slot)

        @pl.when(k + 1 < n_chunks)
        def _():  # the next chunk's dOut rows fly while this one is summed
          for copy in meta_copies(first + k + 1, 1 - slot):
            copy.wait()
          start_douts(1 - slot)

        local_1J = rows_vmem[slot] - row0
        onehot_SJ = jax.lax.broadcasted_iota(jnp.int32, (block_rows, chunk), 0) == local_1J
        scaled_SJ = jnp.where(onehot_SJ, w_vmem[slot], 0.0)
        acc_vmem[...] += jnp.dot(scaled_SJ, dout_vmem[slot], precision=_HIGHEST,
                                 preferred_element_type=jnp.float32)

        @pl.when(k + 2 < n_chunks)
        def _():
          for copy in meta_copies(first + k + 2, slot):
            copy.start()

        return carry

      jax.lax.fori_loop(0, n_chunks, step, 0)

    dv_vmem[...] = acc_vmem[...].astype(dv_vmem.dtype)

  n_blocks = -(-n_slots // block_rows)
  itemsize = jnp.dtype(dtype).itemsize
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  bounds_Y2 = jnp.stack([starts[:-1], starts[1:]], axis=1)
  bounds_Y2 = jnp.pad(bounds_Y2, ((0, _round_up(n_blocks, _BOUNDS_ROWS) - n_blocks), (0, 0)))
  return pl.pallas_call(
      kernel,
      out_shape=_out_shape((n_slots, dim), dtype, rows_YJ),
      grid=(n_blocks, dim // block_dim),
      in_specs=[pl.BlockSpec((_BOUNDS_ROWS, 2), lambda b, c: (jax.lax.div(b, _BOUNDS_ROWS), 0),
                             memory_space=pltpu.SMEM),
                *[any_spec] * 4],
      out_specs=pl.BlockSpec((block_rows, block_dim), lambda b, c: (b, c)),
      scratch_shapes=[
          pltpu.VMEM((block_rows, block_dim), jnp.float32),
          pltpu.SMEM((2, 1, chunk), jnp.int32),
          pltpu.VMEM((2, 1, chunk), jnp.int32),
          pltpu.VMEM((2, 1, chunk), jnp.float32),
          pltpu.VMEM((2, chunk, block_dim), jnp.float32),
          pltpu.SemaphoreType.DMA((3, 2)),
          pltpu.SemaphoreType.DMA((2,)),
      ],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      cost_estimate=pl.CostEstimate(
          flops=2 * n_entries * dim,
          transcendentals=0,
          bytes_accessed=n_entries * (dim * 4 + 12) + n_slots * dim * itemsize,
      ),
      interpret=interpret,
      name="memjax_sorted_row_grad",
  )(bounds_Y2, rows_YJ, tok_YJ, w_YJ, dout_NV)
