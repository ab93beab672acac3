"""Product-key selection (spec 1.3, steps 2 to 8), the one component that the memory layer and
PEER choose their slots with: each head's query is split in two halves, each half is scored
against its own M sub-keys, the top K of each half make a K x K grid of summed scores, and the
grid's top K are the chosen slots i * M + j, weighted by a float32 softmax of their scores.

Axis letters (see memjax): N tokens (B*T), D model dim, H heads, E half key dim (k_dim / 2), M
sub-keys per half (n_keys), K knn, R selection rows (N*H), 2 the two halves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from memjax import sharding
from memjax.layers import init
from memjax.layers.norms import rms_normalise
from memjax.ops import product_topk, row_dots


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


class ProductKeys(nnx.Module):
  """x (N, D) -> K of M**2 slots per head and their softmax weights.

  Parameters, under the reference's names (a layer holds this module as `product_keys`; the
  reference's `HashingMemory` holds them itself): `keys` (H, 2, M, E), Uniform(+-k_dim**-0.5),
  and `query_proj` (D -> H * k_dim, head-major columns), Xavier-uniform with a zero bias.
  """

  def __init__(
      self, dim: int, *, heads: int, knn: int, n_keys: int, k_dim: int, query_bias: bool,
      impl: str, qk_norm: bool = False, query_dropout: float = 0.0, norm_eps: float = 1e-5,
      dtype, param_dtype, rngs: nnx.Rngs,
  ):
    """Args:
      qk_norm: RMS-normalise the query halves and the sub-keys (the paper's; not the reference
        code's), with `norm_eps`.
      impl: the lookup implementation of the top-k and the chosen scores' gradient
        (`memjax.ops`).
    """
    self.heads, self.knn, self.n_keys, self.half = heads, knn, n_keys, k_dim // 2
    self.qk_norm, self.norm_eps, self.impl = qk_norm, norm_eps, impl
    # The bound uses the full k_dim, as the reference does.
    self.keys = nnx.Param(
        init.uniform(k_dim**-0.5)(rngs.params(), (heads, 2, n_keys, self.half), param_dtype),
        **sharding.logical(sharding.KEY_HEADS, None, sharding.SUB_KEYS, sharding.KEY_DIM),
    )
    self.query_proj = nnx.Linear(
        dim, heads * k_dim, use_bias=query_bias, kernel_init=nnx.initializers.xavier_uniform(),
        kernel_metadata=sharding.logical(sharding.EMBED, sharding.QUERY),
        bias_metadata=sharding.logical(sharding.BIAS),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )
    self.query_dropout = nnx.Dropout(query_dropout, rngs=rngs)

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

  def query(self, x_ND: jax.Array) -> tuple[jax.Array, jax.Array]:
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

    `query` is `self.query(x_ND)` when the caller has it (it folds nothing then).
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
    query_NH2E, keys_H2ME = query if query is not None else self.query(x_ND)
    return jnp.einsum("nhse,hsme->nhsm", query_NH2E, keys_H2ME)

  def __call__(self, x_ND: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Slots and their softmax weights per (token, head): (N, H, K) int32 and (N, H, K).

    The scores of all 2 x M sub-keys choose the slots; the gradient of the chosen scores is
    taken from the gathered sub-keys alone (`_chosen_scores`): the same gradient, without the
    O(M) scoring's two matmuls in the backward.
    """
    n, d = x_ND.shape
    fold = self._fold_query(n, d)
    query = None if fold else self.query(x_ND)
    scores_NH2M = jax.lax.stop_gradient(self.half_scores(x_ND, query))
    rows = n * self.heads
    top_k = functools.partial(product_topk, knn=self.knn, impl=self.impl)
    chosen = functools.partial(_chosen_scores, impl=self.impl)
    if (mesh := sharding.token_mesh(n)) is not None:
      # Per device on its own rows: XLA cannot split a kernel's custom call by itself, and
      # would gather every device's scores to each.
      rows_spec = P(sharding.BATCH)
      top_k = jax.shard_map(top_k, mesh=mesh, in_specs=(rows_spec,) * 2, out_specs=(rows_spec,) * 2)
      chosen = jax.shard_map(
          chosen, mesh=mesh, in_specs=(rows_spec, rows_spec, P(), rows_spec), out_specs=rows_spec
      )
    scores_RK, slots_RK = top_k(
        scores_NH2M[:, :, 0].reshape(rows, self.n_keys),
        scores_NH2M[:, :, 1].reshape(rows, self.n_keys),
    )
    shape = (n, self.heads, self.knn)
    slots_NHK = slots_RK.reshape(shape)
    query_NH2E, keys_H2ME = self.query(x_ND) if fold else query
    scores_NHK = chosen(scores_RK.reshape(shape), query_NH2E, keys_H2ME, slots_NHK)
    weights_NHK = jax.nn.softmax(scores_NHK.astype(jnp.float32), axis=-1).astype(scores_NHK.dtype)
    return slots_NHK, weights_NHK
