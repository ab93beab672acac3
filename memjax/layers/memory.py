"""The product-key memory layer (Memory and Memory+), spec section 1.3.

Axis letters (see memjax): N tokens (B*T), D model dim, H memory heads, K top-k per head (knn) or
bag positions (H*K, the heads' reads in one bag), S slots (n_keys**2), V value dim, U distinct rows
(of a sparse read).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax import sharding
from memjax.config import ModelConfig
from memjax.layers import init
from memjax.layers.selection import ProductKeys
from memjax.ops.memory_parallel import bag_on_mesh
from memjax.ops.table_rows import compact_rows

# Under `nnx.capture`: the gradient of the rows a sparse read gathered (an nnx.Perturbation),
# and their ids in the table (an nnx.Intermediate).
TABLE_ROWS, TABLE_ROW_IDS = "table_rows", "table_row_ids"
# The nnx.Intermediate a layer viewed with `record_selection=True` sows: (slots_NHK, weights_NHK).
SELECTION = "selection"


class MemoryValues(nnx.Param):
  """The (S, V) value table. Its own type so the optimizer, sharding and checkpoints select it."""


def new_value_table(cfg: ModelConfig, rngs: nnx.Rngs) -> MemoryValues:
  """Normal(0, V**-0.5), in the memory's value dtype."""
  shape = (cfg.memory.n_slots, cfg.value_dim)
  dtype = init.DTYPES[cfg.memory.value_dtype]
  return MemoryValues(
      init.normal(cfg.value_dim**-0.5)(rngs.params(), shape, dtype),
      **sharding.logical(sharding.SLOTS, sharding.SLOT_DIM),
  )


class ProductKeyMemory(nnx.Module):
  """Replaces a block's FFN: a sparse read of top-k slots of a (shared) value table.

  Parameter names follow the reference's `HashingMemory` so checkpoints convert by name:
  `swilu_projection`, `value_proj`, `gating`, `values`, and the selection's `keys` (H, 2, M, E)
  and `query_proj`, which memjax holds under `product_keys` (`memjax.layers.selection`).
  """

  def __init__(self, cfg: ModelConfig, *, values: MemoryValues | None = None, rngs: nnx.Rngs):
    mem = cfg.memory
    dim, v_dim = cfg.dim, cfg.value_dim
    self.impl = mem.impl
    dtype, param_dtype = init.DTYPES[cfg.dtype], init.DTYPES[cfg.param_dtype]
    linear = lambda d_in, d_out, axes: nnx.Linear(
        d_in, d_out, kernel_init=init.normal(dim**-0.5),
        kernel_metadata=sharding.logical(*axes), bias_metadata=sharding.logical(sharding.BIAS),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )

    self.product_keys = ProductKeys(
        dim, heads=mem.heads, knn=mem.knn, n_keys=mem.n_keys, k_dim=mem.k_dim,
        query_bias=mem.query_bias, impl=mem.impl, qk_norm=mem.qk_norm,
        query_dropout=mem.query_dropout, norm_eps=cfg.norm_eps, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs,
    )
    self.values = values if values is not None else new_value_table(cfg, rngs)
    # Memory+ gates the bag with silu(W1 x) and projects it back; plain Memory projects only when
    # the value dim differs from the model dim.
    self.swilu_projection = (
        linear(dim, v_dim, (sharding.EMBED, sharding.VALUE)) if mem.swilu else None
    )
    self.value_proj = (
        linear(v_dim, dim, (sharding.VALUE, sharding.EMBED)) if mem.swilu or mem.v_dim > 0
        else None
    )
    self.gating = linear(dim, 1, (sharding.EMBED, None)) if mem.gated else None
    self.input_dropout = nnx.Dropout(mem.input_dropout, rngs=rngs)
    self.value_dropout = nnx.Dropout(mem.value_dropout, rngs=rngs)
    self.sparse_table_grad = False
    self.record_selection = False

  def set_view(
      self, sparse_table_grad: bool | None = None, record_selection: bool | None = None
  ):
    """Args:
      sparse_table_grad: if True, the lookup reads a compact copy of the rows it touches,
        through `self.perturb(TABLE_ROWS, ...)`: under `nnx.capture` with that perturbation,
        its gradient is the touched rows' gradient, and the table itself needs none.
      record_selection: if True, each call sows its selection as the nnx.Intermediate
        `SELECTION`, for memory diagnostics; read it with `nnx.capture(view, nnx.Intermediate)`.
    """
    if sparse_table_grad is not None:
      self.sparse_table_grad = sparse_table_grad
    if record_selection is not None:
      self.record_selection = record_selection

  def select(self, x_ND: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Slots and their softmax weights per (token, head): (N, H, K) int32 and (N, H, K)."""
    return self.product_keys(x_ND)

  def _read(self, idx_NK: jax.Array, w_NK: jax.Array) -> jax.Array:
    """The bag over the whole table, or over a compact copy of the rows it touches whose
    gradient `nnx.capture` records (`sparse_table_grad`)."""
    table_SV = self.values[...]
    if not self.sparse_table_grad:
      return bag_on_mesh(table_SV, idx_NK, w_NK, self.impl)
    rows_U, local_NK = compact_rows(idx_NK, table_SV.shape[0])
    table_UV = jnp.take(table_SV, rows_U, axis=0, mode="clip")
    self.sow(nnx.Intermediate, TABLE_ROW_IDS, rows_U, reduce_fn=lambda _, new: new)
    return bag_on_mesh(self.perturb(TABLE_ROWS, table_UV), local_NK, w_NK, self.impl)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    b, t, d = x_BTD.shape
    x_ND = self.input_dropout(x_BTD.reshape(b * t, d))
    slots_NHK, weights_NHK = self.select(x_ND)
    # Only a view that asks for it records the selection (memjax.diagnostics): a plain call
    # records nothing and leaves the module as is.
    if self.record_selection:
      self.sow(nnx.Intermediate, SELECTION, (slots_NHK, weights_NHK), reduce_fn=lambda _, new: new)
    bag = self.product_keys.heads * self.product_keys.knn  # heads are summed into one bag
    read_NV = self._read(slots_NHK.reshape(b * t, bag), weights_NHK.reshape(b * t, bag))
    if self.swilu_projection is not None:
      out_ND = self.value_proj(read_NV * jax.nn.silu(self.swilu_projection(x_ND)))
    elif self.value_proj is not None:
      out_ND = self.value_proj(read_NV)
    else:
      out_ND = read_NV
    out_ND = self.value_dropout(out_ND)
    if self.gating is not None:
      out_ND = jax.nn.sigmoid(self.gating(x_ND)) * out_ND
    return out_ND.reshape(b, t, -1)
