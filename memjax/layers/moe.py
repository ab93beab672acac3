"""The routed mixture-of-experts FFN baseline: a top-k router over E SwiGLU experts.

Axis letters: N tokens (B*T), D model dim, E experts, K experts per token (top_k), F expert hidden
dim, A assignments (N*K, sorted by expert), P padded assignments, G tiles, R rows per tile.

Dispatch is dropless and sort-based: the N*K (token, expert) assignments are sorted by expert so
that each expert's tokens form one contiguous group, the experts run as one grouped matmul over
the groups, and the results go back to assignment order to be summed per token with the gates.
Two grouped matmuls compute the same thing (`moe.impl`):
- "ragged": `jax.lax.ragged_dot`, which TPU and GPU backends lower to grouped-matmul kernels. XLA
  on CPU expands it into E masked dense matmuls: E times the FLOPs of the assignments.
- "blocked": each group is padded to a multiple of `block` rows, so that every tile of `block`
  rows belongs to one expert, and a batched matmul multiplies each tile by its expert's weights:
  at most N*K + E*(block-1) rows of work, whatever the routing.

Load balancing (Switch Transformer, GShard): loss = E * sum_e f_e * p_e, with f_e the share of
the N*K assignments that go to expert e and p_e the mean router probability of e over the tokens.
f carries no gradient; p does. A uniform router (p_e = 1/E) gives exactly 1 whatever the
assignment, a router that sends every token to one expert with certainty gives E.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax import sharding
from memjax.config import ModelConfig
from memjax.layers import init


def route(logits_NE: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Experts (N, K) int32 best first, their gates (N, K) (softmax renormalised over the K) and
  the load-balancing loss, from float32 router logits."""
  probs_NE = jax.nn.softmax(logits_NE, axis=-1)
  top_NK, experts_NK = jax.lax.top_k(probs_NE, top_k)
  gates_NK = top_NK / jnp.sum(top_NK, axis=-1, keepdims=True)
  n_experts = logits_NE.shape[-1]
  counts_E = jnp.zeros((n_experts,), jnp.float32).at[experts_NK.reshape(-1)].add(1.0)
  share_E = jax.lax.stop_gradient(counts_E / experts_NK.size)
  balance = n_experts * jnp.sum(share_E * jnp.mean(probs_NE, axis=0))
  return experts_NK, gates_NK, balance


def _tiles(expert_A: jax.Array, sizes_E: jax.Array, n_experts: int, block: int):
  """For assignments sorted by expert: each one's row in the padded layout (A,), each tile's
  expert (G,), and the padded row count G * block (static)."""
  a = expert_A.shape[0]
  starts_E = jnp.cumsum(sizes_E) - sizes_E
  padded_E = (sizes_E + block - 1) // block * block
  padded_ends_E = jnp.cumsum(padded_E)
  row_A = (padded_ends_E - padded_E)[expert_A] + jnp.arange(a) - starts_E[expert_A]
  n_tiles = -(-(a + n_experts * (block - 1)) // block)  # sum_e ceil(size_e / R) is at most this
  tile_expert_G = jnp.searchsorted(padded_ends_E, jnp.arange(n_tiles) * block, side="right")
  # Tiles past the last group hold only zero rows; any expert will do.
  return row_A, jnp.minimum(tile_expert_G, n_experts - 1).astype(jnp.int32), n_tiles * block


def grouped_swiglu(
    x_AD: jax.Array, expert_A: jax.Array, w1_EDF, w3_EDF, w2_EFD, *, impl: str, block: int
) -> jax.Array:
  """w2_e(silu(w1_e x) * w3_e x) for each row x of `x_AD` and its expert e, rows sorted by expert."""
  n_experts = w1_EDF.shape[0]
  sizes_E = jnp.bincount(expert_A, length=n_experts).astype(jnp.int32)
  if impl == "ragged":
    mm = lambda x, w: jax.lax.ragged_dot(x, w, sizes_E)
    return mm(jax.nn.silu(mm(x_AD, w1_EDF)) * mm(x_AD, w3_EDF), w2_EFD)
  row_A, tile_expert_G, rows = _tiles(expert_A, sizes_E, n_experts, block)
  x_GRD = jnp.zeros((rows, x_AD.shape[1]), x_AD.dtype).at[row_A].set(x_AD).reshape(-1, block, x_AD.shape[1])
  mm = lambda x, w: jnp.einsum("grd,gdf->grf", x, w[tile_expert_G])
  # Zero padding rows stay zero through the SwiGLU: silu(0) * 0 = 0.
  y_GRD = mm(jax.nn.silu(mm(x_GRD, w1_EDF)) * mm(x_GRD, w3_EDF), w2_EFD)
  return y_GRD.reshape(rows, -1)[row_A]


def dispatch(
    x_ND: jax.Array, experts_NK: jax.Array, gates_NK: jax.Array, w1_EDF, w3_EDF, w2_EFD, *,
    impl: str, block: int,
) -> jax.Array:
  """sum_k gates[n, k] * expert_{experts[n, k]}(x[n]), every assignment computed (dropless)."""
  n, k = experts_NK.shape
  expert_A = experts_NK.reshape(n * k)
  order_A = jnp.argsort(expert_A, stable=True)  # sorted position -> assignment (token * K + k)
  y_AD = grouped_swiglu(
      x_ND[order_A // k], expert_A[order_A], w1_EDF, w3_EDF, w2_EFD, impl=impl, block=block
  )
  y_NKD = jnp.zeros_like(y_AD).at[order_A].set(y_AD).reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", y_NKD, gates_NK.astype(y_NKD.dtype))


def resolve_impl(impl: str) -> str:
  if impl != "auto":
    return impl
  return "blocked" if jax.default_backend() == "cpu" else "ragged"


# The nnx.Intermediate a layer viewed with `record_balance_loss=True` sows: its balance loss.
BALANCE_LOSS = "balance_loss"


class MoE(nnx.Module):
  """Replaces a block's FFN. Parameters: `router` (D -> E, no bias), expert weights `w1`, `w3`
  (E, D, F) and `w2` (E, F, D), initialised as the dense FFN's w1, w3 and w2."""

  def __init__(self, cfg: ModelConfig, *, in_std: float, out_std: float, rngs: nnx.Rngs):
    moe = cfg.moe
    self.top_k, self.block, self.impl = moe.top_k, moe.block, moe.impl
    dtype, param_dtype = init.DTYPES[cfg.dtype], init.DTYPES[cfg.param_dtype]
    self.dtype = dtype
    d, f, e = cfg.dim, cfg.expert_hidden_dim, moe.experts
    self.router = nnx.Linear(
        d, e, use_bias=False, kernel_init=init.trunc_normal(in_std),
        kernel_metadata=sharding.logical(sharding.EMBED, sharding.EXPERTS),
        param_dtype=param_dtype, rngs=rngs,
    )
    weight = lambda std, shape, *axes: nnx.Param(
        init.trunc_normal(std)(rngs.params(), shape, param_dtype), **sharding.logical(*axes)
    )
    self.w1 = weight(in_std, (e, d, f), sharding.EXPERTS, sharding.EMBED, sharding.MLP)
    self.w3 = weight(in_std, (e, d, f), sharding.EXPERTS, sharding.EMBED, sharding.MLP)
    self.w2 = weight(out_std, (e, f, d), sharding.EXPERTS, sharding.MLP, sharding.EMBED)
    self.record_balance_loss = False

  def set_view(self, record_balance_loss: bool | None = None):
    """Args:
      record_balance_loss: if True, each call sows its load-balancing loss as the
        nnx.Intermediate `BALANCE_LOSS`, for the training loss; read it with
        `nnx.capture(view, nnx.Intermediate)`.
    """
    if record_balance_loss is not None:
      self.record_balance_loss = record_balance_loss

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    b, t, d = x_BTD.shape
    x_ND = x_BTD.reshape(b * t, d)
    # Routing in float32 whatever the compute dtype: top-k on near-equal bfloat16 probabilities
    # would flip between experts.
    logits_NE = x_ND.astype(jnp.float32) @ self.router.kernel[...].astype(jnp.float32)
    experts_NK, gates_NK, balance = route(logits_NE, self.top_k)
    if self.record_balance_loss:
      self.sow(nnx.Intermediate, BALANCE_LOSS, balance, reduce_fn=lambda _, new: new)
    cast = lambda w: w[...].astype(self.dtype)
    out_ND = dispatch(
        x_ND.astype(self.dtype), experts_NK, gates_NK, cast(self.w1), cast(self.w3), cast(self.w2),
        impl=resolve_impl(self.impl), block=self.block,
    )
    return out_ND.reshape(b, t, d)
