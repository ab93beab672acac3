"""The PEER baseline (the reference's `peer_variant`, spec 1.3): product keys select single-neuron
experts. Expert i is a pair of rows (u_i, v_i) of two (S, D) tables; a token's output is
sum over heads h and selected experts k of w_hk * gelu(<x, u_hk>) * v_hk, w the softmax of the
selection scores per head.

Axis letters: N tokens (B*T), D model dim, H heads, E half key dim, M sub-keys per half,
K experts per head (knn), L = H*K experts read per token, S experts (M**2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import ModelConfig
from memjax.layers import init
from memjax.ops import embedding_bag, product_topk


class PEER(nnx.Module):
  """Replaces a block's FFN. Parameter names are the reference's: `keys` (H, 2, M, E),
  `query_proj`, `values_u`, `values_v`. (The reference also builds a swilu projection and a value
  projection that its PEER branch never uses; memjax leaves them out.)"""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    peer = cfg.peer
    self.heads, self.knn, self.n_keys, self.half = peer.heads, peer.knn, peer.n_keys, peer.k_dim // 2
    dtype, param_dtype = init.DTYPES[cfg.dtype], init.DTYPES[cfg.param_dtype]
    # Sub-keys and query as the memory layer's (spec 1.5); the expert tables as its value table.
    self.keys = nnx.Param(
        init.uniform(peer.k_dim**-0.5)(
            rngs.params(), (peer.heads, 2, peer.n_keys, self.half), param_dtype
        )
    )
    self.query_proj = nnx.Linear(
        cfg.dim, peer.heads * peer.k_dim, use_bias=peer.query_bias,
        kernel_init=nnx.initializers.xavier_uniform(), dtype=dtype, param_dtype=param_dtype,
        rngs=rngs,
    )
    table = lambda: nnx.Embed(
        peer.n_experts, cfg.dim, embedding_init=init.normal(cfg.dim**-0.5), dtype=dtype,
        param_dtype=param_dtype, rngs=rngs,
    )
    self.values_u = table()
    self.values_v = table()

  def select(self, x_ND: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Experts and their softmax weights per (token, head): (N, H, K) int32 and (N, H, K)."""
    n = x_ND.shape[0]
    query_NH2E = self.query_proj(x_ND).reshape(n, self.heads, 2, self.half)
    keys_H2ME = self.keys[...].astype(query_NH2E.dtype)
    scores_NH2M = jnp.einsum("nhse,hsme->nhsm", query_NH2E, keys_H2ME)
    rows = n * self.heads
    scores_RK, experts_RK = product_topk(
        scores_NH2M[:, :, 0].reshape(rows, self.n_keys),
        scores_NH2M[:, :, 1].reshape(rows, self.n_keys),
        self.knn,
    )
    weights_RK = jax.nn.softmax(scores_RK.astype(jnp.float32), axis=-1).astype(scores_RK.dtype)
    shape = (n, self.heads, self.knn)
    return experts_RK.reshape(shape), weights_RK.reshape(shape)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    b, t, d = x_BTD.shape
    x_ND = x_BTD.reshape(b * t, d)
    experts_NHK, weights_NHK = self.select(x_ND)
    experts_NL = experts_NHK.reshape(b * t, -1)
    u_NLD = jnp.take(self.values_u.embedding[...], experts_NL, axis=0).astype(x_ND.dtype)
    # The exact (erf) gelu, as torch's default.
    act_NL = jax.nn.gelu(jnp.einsum("nd,nld->nl", x_ND, u_NLD), approximate=False)
    act_NL = act_NL * weights_NHK.reshape(b * t, -1).astype(act_NL.dtype)
    # The down projection is a weighted bag of v rows: the memory layer's op and its backward.
    out_ND = embedding_bag(self.values_v.embedding[...], experts_NL, act_NL)
    return out_ND.reshape(b, t, d)
