"""Triton kernels of the embedding bag: the forward and a row-sorted backward.

Both accumulate in float32 and take float32, bfloat16 or float16 tables. Shapes that fix the
address arithmetic (DIM, BAG, ...) are constexprs, so the compiler sees that a row starts on a
multiple of DIM and issues 16-byte loads where DIM allows; value dims need not be powers of two
(columns past DIM are masked). Row offsets are int64: a 1024^2 x 4096 table has 2^32 elements.

Importing this module needs only `triton`; the kernels run on a GPU through jax-triton
(`pallas_kernels.gpu.ops`) or on the CPU under Triton's interpreter (the tests).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bag_forward_kernel(
    values_ptr,  # (N_SLOTS, DIM) table
    idx_ptr,  # (N, BAG) int32 row ids; out-of-range ids read the clamped row
    w_ptr,  # (N, BAG) weights (float32, bfloat16 or float16)
    out_ptr,  # (N, DIM) output, in the weights' dtype (the sum is float32)
    N_SLOTS: tl.constexpr,
    DIM: tl.constexpr,
    BAG: tl.constexpr,
    BLOCK_K: tl.constexpr,  # bag positions loaded together: that many rows in flight
    BLOCK_V: tl.constexpr,  # columns per program (a power of two)
):
  """out[t, cols] = sum_k w[t, k] * values[idx[t, k], cols]; grid (N, cdiv(DIM, BLOCK_V))."""
  token = tl.program_id(0).to(tl.int64)
  cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
  col_ok = cols < DIM
  acc = tl.zeros((BLOCK_V,), tl.float32)
  for k0 in range(0, BAG, BLOCK_K):
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < BAG
    rows = tl.load(idx_ptr + token * BAG + ks, mask=k_ok, other=0)
    rows = tl.minimum(tl.maximum(rows, 0), N_SLOTS - 1).to(tl.int64)
    w = tl.load(w_ptr + token * BAG + ks, mask=k_ok, other=0.0).to(tl.float32)
    # A (BLOCK_K, BLOCK_V) tile: BLOCK_K independent row reads before the first use.
    tile = tl.load(
        values_ptr + rows[:, None] * DIM + cols[None, :],
        mask=k_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    acc += tl.sum(tile.to(tl.float32) * w[:, None], axis=0)
  tl.store(out_ptr + token * DIM + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def bag_backward_kernel(
    values_ptr,  # (N_SLOTS, DIM) table
    dout_ptr,  # (N, DIM) output gradient (float32, bfloat16 or float16)
    w_ptr,  # (N * BAG,) float32 weights, zero where the id was out of range
    order_ptr,  # (N * BAG,) int32 flat lookup ids (t * BAG + k) sorted by row, stably
    starts_ptr,  # (N_SLOTS + 1,) int32: row r's lookups are order[starts[r]:starts[r + 1]]
    rows_ptr,  # (N_SLOTS,) int32: the rows in the order the programs take them
    dvalues_ptr,  # (N_SLOTS, DIM) table gradient, in the table's dtype
    dw_ptr,  # (cdiv(DIM, BLOCK_V), N * BAG) float32 weight-gradient partials, one per column block
    N_SLOTS: tl.constexpr,
    DIM: tl.constexpr,
    BAG: tl.constexpr,
    N_LOOKUPS: tl.constexpr,
    BLOCK_R: tl.constexpr,  # table rows per program (consecutive entries of rows), in turn
    BLOCK_J: tl.constexpr,  # lookups of one row loaded together
    BLOCK_V: tl.constexpr,  # columns per program (a power of two)
):
  """Table and weight gradients over rows; grid (cdiv(N_SLOTS, BLOCK_R), cdiv(DIM, BLOCK_V)).

  Each program owns BLOCK_R whole rows of one column block: it sums w * dOut over each row's
  lookups in sorted order and writes the row once (zeros for rows nobody read), so the result is
  deterministic with no atomics. With the lookups sorted by row, each table row is read once, for
  the weight gradients <dOut[t], values[row]> of all its lookups (partial sums over this block's
  columns). Program ids run over rows fastest, so the programs in flight share one column block
  and its slab of dOut stays in L2. One program sums all of a row's lookups: a row read by very
  many tokens (skewed memory use) makes a long program, so `rows` lists the most-read rows first
  (as the reference does) and those programs start early.
  """
  block = tl.program_id(1)
  cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
  col_ok = cols < DIM
  dw_block_ptr = dw_ptr + block.to(tl.int64) * N_LOOKUPS
  for i in range(BLOCK_R):
    position = tl.program_id(0) * BLOCK_R + i
    if position < N_SLOTS:
      row = tl.load(rows_ptr + position)
      start = tl.load(starts_ptr + row)
      end = tl.load(starts_ptr + row + 1)
      row_offset = row.to(tl.int64) * DIM
      # Rows nobody read are not loaded: no column is in range.
      read_cols = cols < tl.where(end > start, DIM, 0)
      value_row = tl.load(values_ptr + row_offset + cols, mask=read_cols, other=0.0)
      value_row = value_row.to(tl.float32)
      acc = tl.zeros((BLOCK_V,), tl.float32)
      for j0 in range(start, end, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_ok = js < end
        lookup = tl.load(order_ptr + js, mask=j_ok, other=0)
        w = tl.load(w_ptr + lookup, mask=j_ok, other=0.0)
        tokens = (lookup // BAG).to(tl.int64)
        dout = tl.load(
            dout_ptr + tokens[:, None] * DIM + cols[None, :],
            mask=j_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(dout * w[:, None], axis=0)
        tl.store(dw_block_ptr + lookup, tl.sum(dout * value_row[None, :], axis=1), mask=j_ok)
      tl.store(dvalues_ptr + row_offset + cols, acc.to(dvalues_ptr.dtype.element_ty), mask=col_ok)
