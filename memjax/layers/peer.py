"""The PEER baseline (the reference's `peer_variant`, spec 1.3): product keys select single-neuron
experts. Expert i is a pair of rows (u_i, v_i) of two (S, D) tables; a token's output is
sum over heads h and selected experts k of w_hk * gelu(<x, u_hk>) * v_hk, w the softmax of the
selection scores per head.

Axis letters (see memjax): N tokens (B*T), D model dim, H heads, K experts per head (knn), L = H*K
experts read per token, S experts (rows of the tables, M**2).
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


class PEER(nnx.Module):
  """Replaces a block's FFN. Parameter names are the reference's: `values_u`, `values_v`, and the
  selection's `keys` (H, 2, M, E) and `query_proj`, which memjax holds under `product_keys`.
  (The reference also builds a swilu projection and a value projection that its PEER branch
  never uses; memjax leaves them out.)"""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    peer = cfg.peer
    self.impl = peer.impl
    dtype, param_dtype = init.DTYPES[cfg.dtype], init.DTYPES[cfg.param_dtype]
    # Sub-keys and query as the memory layer's (spec 1.5); the expert tables as its value table.
    self.product_keys = ProductKeys(
        cfg.dim, heads=peer.heads, knn=peer.knn, n_keys=peer.n_keys, k_dim=peer.k_dim,
        query_bias=peer.query_bias, impl=peer.impl, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs,
    )
    table = lambda: nnx.Embed(
        peer.n_experts, cfg.dim, embedding_init=init.normal(cfg.dim**-0.5),
        embedding_metadata=sharding.logical(sharding.EXPERTS, sharding.EMBED),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )
    self.values_u = table()
    self.values_v = table()

  def select(self, x_ND: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Experts and their softmax weights per (token, head): (N, H, K) int32 and (N, H, K)."""
    return self.product_keys(x_ND)

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
    out_ND = bag_on_mesh(self.values_v.embedding[...], experts_NL, act_NL, self.impl)
    return out_ND.reshape(b, t, d)
