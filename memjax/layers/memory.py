"""The product-key memory layer (Memory and Memory+), spec section 1.3.

Axis letters: N tokens (B*T), D model dim, H memory heads, E half key dim (k_dim / 2),
M sub-keys per half (n_keys), K knn, S slots (n_keys**2), V value dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from memjax.config import ModelConfig
from memjax.layers import init
from memjax.layers.norms import rms_normalise
from memjax.ops import embedding_bag, product_topk, row_dots
from memjax.ops.memory_parallel import sharded_embedding_bag
from memjax.ops.table_rows import compact_rows

# Under `nnx.capture`: the gradient of the rows a sparse read gathered (an nnx.Perturbation),
# and their ids in the table (an nnx.Intermediate).
TABLE_ROWS, TABLE_ROW_IDS = "table_rows", "table_row_ids"


def _device_mesh(n_tokens: int) -> jax.sharding.AbstractMesh | None:
  """The current mesh when it has several devices and `n_tokens` split evenly over them."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or n_tokens % mesh.size:
    return None
  return mesh


def _rescore(
    query_NH2E: jax.Array, keys_H2ME: jax.Array, slots_NHK: jax.Array, impl: str
) -> jax.Array:
  """<q_h,1, keys[h, 1, i]> + <q_h,2, keys[h, 2, j]> for each chosen slot i * M + j, (N, H, K),
  from the gathered sub-keys alone."""
  n, h, k = slots_NHK.shape
  n_keys, half = keys_H2ME.shape[2:]
  first = (jnp.arange(h, dtype=slots_NHK.dtype) * n_keys)[None, :, None]  # head h's sub-keys
  score_NHK = 0
  for s, sub_NHK in enumerate((slots_NHK // n_keys, slots_NHK % n_keys)):
    dots_RK = row_dots(
        keys_H2ME[:, s].reshape(h * n_keys, half), (first + sub_NHK).reshape(n * h, k),
        query_NH2E[:, :, s].reshape(n * h, half), impl=impl,
    )
    score_NHK = score_NHK + dots_RK.reshape(n, h, k)
  return score_NHK


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chosen_scores(scores_NHK, query_NH2E, keys_H2ME, slots_NHK, impl):
  """`scores_NHK` (the chosen slots' scores, as the full scoring gave them), with the gradient of
  `_rescore`: it reaches the chosen sub-keys and their queries only, O(K) work per token where
  differentiating the full scoring costs its two O(M) matmuls again."""
  del query_NH2E, keys_H2ME, slots_NHK, impl
  return scores_NHK


def _chosen_scores_fwd(scores_NHK, query_NH2E, keys_H2ME, slots_NHK, impl):
  return scores_NHK, (query_NH2E, keys_H2ME, slots_NHK)


def _chosen_scores_bwd(impl, residuals, dscores_NHK):
  query_NH2E, keys_H2ME, slots_NHK = residuals
  _, vjp = jax.vjp(lambda q, k: _rescore(q, k, slots_NHK, impl), query_NH2E, keys_H2ME)
  dquery_NH2E, dkeys_H2ME = vjp(dscores_NHK)
  return jnp.zeros_like(dscores_NHK), dquery_NH2E, dkeys_H2ME, None


_chosen_scores.defvjp(_chosen_scores_fwd, _chosen_scores_bwd)


class MemoryValues(nnx.Param):
  """The (S, V) value table. Its own type so the optimizer, sharding and checkpoints select it."""


def new_value_table(cfg: ModelConfig, rngs: nnx.Rngs) -> MemoryValues:
  """Normal(0, V**-0.5), in the memory's value dtype."""
  shape = (cfg.memory.n_slots, cfg.value_dim)
  dtype = init.DTYPES[cfg.memory.value_dtype]
  return MemoryValues(init.normal(cfg.value_dim**-0.5)(rngs.params(), shape, dtype))


class ProductKeyMemory(nnx.Module):
  """Replaces a block's FFN: a sparse read of top-k slots of a (shared) value table.

  Parameter names follow the reference's `HashingMemory` so checkpoints convert by name:
  `keys` (H, 2, M, E), `query_proj`, `swilu_projection`, `value_proj`, `gating`, `values`.
  """

  def __init__(self, cfg: ModelConfig, *, values: MemoryValues | None = None, rngs: nnx.Rngs):
    mem = cfg.memory
    dim, v_dim = cfg.dim, cfg.value_dim
    self.heads, self.knn, self.n_keys = mem.heads, mem.knn, mem.n_keys
    self.half = mem.k_dim // 2
    self.qk_norm, self.norm_eps = mem.qk_norm, cfg.norm_eps
    self.impl = mem.impl
    dtype, param_dtype = init.DTYPES[cfg.dtype], init.DTYPES[cfg.param_dtype]
    linear = lambda d_in, d_out, kernel_init, **kw: nnx.Linear(
        d_in, d_out, kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs, **kw
    )

    # The bound uses the full k_dim, as the reference does.
    self.keys = nnx.Param(
        init.uniform(mem.k_dim**-0.5)(
            rngs.params(), (mem.heads, 2, mem.n_keys, self.half), param_dtype
        )
    )
    self.query_proj = linear(
        dim, mem.heads * mem.k_dim, nnx.initializers.xavier_uniform(), use_bias=mem.query_bias
    )
    self.values = values if values is not None else new_value_table(cfg, rngs)
    # Memory+ gates the bag with silu(W1 x) and projects it back; plain Memory projects only when
    # the value dim differs from the model dim.
    self.swilu_projection = linear(dim, v_dim, init.normal(dim**-0.5)) if mem.swilu else None
    self.value_proj = (
        linear(v_dim, dim, init.normal(dim**-0.5)) if mem.swilu or mem.v_dim > 0 else None
    )
    self.gating = linear(dim, 1, init.normal(dim**-0.5)) if mem.gated else None
    self.input_dropout = nnx.Dropout(mem.input_dropout, rngs=rngs)
    self.query_dropout = nnx.Dropout(mem.query_dropout, rngs=rngs)
    self.value_dropout = nnx.Dropout(mem.value_dropout, rngs=rngs)
    self.sparse_table_grad = False

  def set_view(self, sparse_table_grad: bool | None = None):
    """Args:
      sparse_table_grad: if True, the lookup reads a compact copy of the rows it touches,
        through `self.perturb(TABLE_ROWS, ...)`: under `nnx.capture` with that perturbation,
        its gradient is the touched rows' gradient, and the table itself needs none.
    """
    if sparse_table_grad is not None:
      self.sparse_table_grad = sparse_table_grad

  def _fold_query(self, n_tokens: int, dim: int) -> bool:
    """Whether scoring x against W_q K^T (folded) does fewer FLOPs than projecting the query first.

    The two orders give the same scores up to rounding; folding skips the (N, H * k_dim) query
    when the model dim and the sub-key count are small next to k_dim (not at the reference's
    sizes). Query dropout and qk-norm act on the query itself, so they keep the projection.
    """
    if self.qk_norm or self.query_dropout.rate > 0:
      return False
    per_token_folded = dim * self.heads * 2 * self.n_keys
    per_token_query = dim * self.heads * 2 * self.half + self.heads * 2 * self.half * self.n_keys
    fold_once = dim * self.heads * 2 * self.half * self.n_keys
    return n_tokens * per_token_folded + fold_once < n_tokens * per_token_query

  def _query(self, x_ND: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The query (N, H, 2, E) and the sub-keys (H, 2, M, E) that are scored against it."""
    n = x_ND.shape[0]
    query_NH2E = self.query_dropout(self.query_proj(x_ND)).reshape(n, self.heads, 2, self.half)
    keys_H2ME = self.keys[...].astype(query_NH2E.dtype)
    if self.qk_norm:
      query_NH2E = rms_normalise(query_NH2E, self.norm_eps).astype(query_NH2E.dtype)
      keys_H2ME = rms_normalise(keys_H2ME, self.norm_eps).astype(keys_H2ME.dtype)
    return query_NH2E, keys_H2ME

  def half_scores(
      self, x_ND: jax.Array, query: tuple[jax.Array, jax.Array] | None = None
  ) -> jax.Array:
    """Scores of every sub-key of both halves, (N, H, 2, M): <q_h,s, keys[h, s, m]>.

    `query` is `_query(x_ND)` when the caller has it (it folds nothing then).
    """
    n, d = x_ND.shape
    if query is None and self._fold_query(n, d):
      keys_H2ME = self.keys[...]
      kernel_DH2E = self.query_proj.kernel[...].reshape(d, self.heads, 2, self.half)
      folded_DH2M = jnp.einsum("dhse,hsme->dhsm", kernel_DH2E, keys_H2ME)
      scores_NH2M = (
          x_ND @ folded_DH2M.reshape(d, -1).astype(x_ND.dtype)
      ).reshape(n, self.heads, 2, self.n_keys)
      if self.query_proj.bias is not None:
        bias_H2E = self.query_proj.bias[...].reshape(self.heads, 2, self.half)
        scores_NH2M = scores_NH2M + jnp.einsum("hse,hsme->hsm", bias_H2E, keys_H2ME).astype(
            scores_NH2M.dtype
        )
      return scores_NH2M
    query_NH2E, keys_H2ME = query if query is not None else self._query(x_ND)
    return jnp.einsum("nhse,hsme->nhsm", query_NH2E, keys_H2ME)

  def select(self, x_ND: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Slots and their softmax weights per (token, head): (N, H, K) int32 and (N, H, K).

    The scores of all 2 x M sub-keys choose the slots; the gradient of the chosen scores is
    taken from the gathered sub-keys alone (`_chosen_scores`): the same gradient, without the
    O(M) scoring's two matmuls in the backward.
    """
    n, d = x_ND.shape
    fold = self._fold_query(n, d)
    query = None if fold else self._query(x_ND)
    scores_NH2M = jax.lax.stop_gradient(self.half_scores(x_ND, query))
    rows = n * self.heads
    top_k = functools.partial(product_topk, knn=self.knn, impl=self.impl)
    if (mesh := _device_mesh(n)) is not None:
      # Per device on its own rows: XLA cannot split a kernel's custom call by itself, and
      # would gather every device's scores to each.
      rows_spec = P(mesh.axis_names)
      top_k = jax.shard_map(top_k, mesh=mesh, in_specs=(rows_spec,) * 2, out_specs=(rows_spec,) * 2)
    scores_RK, slots_RK = top_k(
        scores_NH2M[:, :, 0].reshape(rows, self.n_keys),
        scores_NH2M[:, :, 1].reshape(rows, self.n_keys),
    )
    shape = (n, self.heads, self.knn)
    slots_NHK = slots_RK.reshape(shape)
    query_NH2E, keys_H2ME = self._query(x_ND) if fold else query
    chosen = functools.partial(_chosen_scores, impl=self.impl)
    if mesh is not None:
      chosen = jax.shard_map(chosen, mesh=mesh, in_specs=(rows_spec, rows_spec, P(), rows_spec),
                             out_specs=rows_spec)
    scores_NHK = chosen(scores_RK.reshape(shape), query_NH2E, keys_H2ME, slots_NHK)
    weights_NHK = jax.nn.softmax(scores_NHK.astype(jnp.float32), axis=-1).astype(scores_NHK.dtype)
    return slots_NHK, weights_NHK

  def _read(self, idx_NK: jax.Array, w_NK: jax.Array) -> jax.Array:
    """The bag over the whole table, or over a compact copy of the rows it touches whose
    gradient `nnx.capture` records (`sparse_table_grad`)."""
    table_SV = self.values[...]
    if not self.sparse_table_grad:
      return self._bag(table_SV, idx_NK, w_NK)
    rows_R, local_NK = compact_rows(idx_NK, table_SV.shape[0])
    table_RV = jnp.take(table_SV, rows_R, axis=0, mode="clip")
    self.sow(nnx.Intermediate, TABLE_ROW_IDS, rows_R, reduce_fn=lambda _, new: new)
    return self._bag(self.perturb(TABLE_ROWS, table_RV), local_NK, w_NK)

  def _bag(self, table_SV: jax.Array, idx_NK: jax.Array, w_NK: jax.Array) -> jax.Array:
    """Per device on its tokens when the current mesh has several devices (and over the table's
    column slices when it has a `memory` axis; `memjax.ops.memory_parallel`), else one op."""
    mesh = jax.sharding.get_abstract_mesh()
    if "memory" in mesh.axis_names and (
        mesh.shape["memory"] > 1 or _device_mesh(idx_NK.shape[0]) is not None
    ):
      return sharded_embedding_bag(
          table_SV, idx_NK, w_NK, mesh=mesh, token_axes=mesh.axis_names,
          memory_axis="memory", impl=self.impl,
      )
    return embedding_bag(table_SV, idx_NK, w_NK, impl=self.impl)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    b, t, d = x_BTD.shape
    x_ND = self.input_dropout(x_BTD.reshape(b * t, d))
    slots_NHK, weights_NHK = self.select(x_ND)
    # Under nnx.capture(model, nnx.Intermediate), the selection is recorded for memory
    # diagnostics (memjax.diagnostics); a plain call records nothing and leaves the module as is.
    if hasattr(self, "__captures__"):
      self.sow(nnx.Intermediate, "selection", (slots_NHK, weights_NHK), reduce_fn=lambda _, new: new)
    bag = self.heads * self.knn  # heads are summed into one bag
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
