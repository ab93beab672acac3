"""The routed mixture-of-experts FFN baseline: a top-k router over X SwiGLU experts.

Axis letters (see memjax): N tokens (B*T), D model dim, X experts, K experts per token (top_k),
F expert hidden dim, J assignments (the N*K (token, expert) pairs, sorted by expert, padded in the
blocked layout), Y tiles.

Dispatch is dropless and sort-based: the N*K (token, expert) assignments are sorted by expert so
that each expert's tokens form one contiguous group, the experts run as one grouped matmul over
the groups, and the results go back to assignment order to be summed per token with the gates.
Two grouped matmuls compute the same thing (`moe.impl`):
- "ragged": `jax.lax.ragged_dot`, which TPU and GPU backends lower to grouped-matmul kernels. XLA
  on CPU expands it into X masked dense matmuls: X times the FLOPs of the assignments.
- "blocked": each group is padded to a multiple of `block` rows, so that every tile of `block`
  rows belongs to one expert, and a batched matmul multiplies each tile by its expert's weights:
  at most N*K + X*(block-1) rows of work, whatever the routing.

Load balancing (Switch Transformer, GShard): loss = X * sum_e f_e * p_e, with f_e the share of
the N*K assignments that go to expert e and p_e the mean router probability of e over the tokens.
f carries no gradient; p does. A uniform router (p_e = 1/X) gives exactly 1 whatever the
assignment, a router that sends every token to one expert with certainty gives X.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax import sharding
from memjax.config import ModelConfig
from memjax.layers import init


def route(logits_NX: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Experts (N, K) int32 best first, their gates (N, K) (softmax renormalised over the K) and
  the load-balancing loss, from float32 router logits."""
  probs_NX = jax.nn.softmax(logits_NX, axis=-1)
  top_NK, experts_NK = jax.lax.top_k(probs_NX, top_k)
  gates_NK = top_NK / jnp.sum(top_NK, axis=-1, keepdims=True)
  n_experts = logits_NX.shape[-1]
  counts_X = jnp.zeros((n_experts,), jnp.float32).at[experts_NK.reshape(-1)].add(1.0)
  share_X = jax.lax.stop_gradient(counts_X / experts_NK.size)
  balance = n_experts * jnp.sum(share_X * jnp.mean(probs_NX, axis=0))
  return experts_NK, gates_NK, balance


def _tiles(expert_J: jax.Array, sizes_X: jax.Array, n_experts: int, block: int):
  """For assignments sorted by expert: each one's row in the padded layout (J,), each tile's
  expert (Y,), and the padded row count Y * block (static)."""
  a = expert_J.shape[0]
  starts_X = jnp.cumsum(sizes_X) - sizes_X
  padded_X = (sizes_X + block - 1) // block * block
  padded_ends_X = jnp.cumsum(padded_X)
  row_J = (padded_ends_X - padded_X)[expert_J] + jnp.arange(a) - starts_X[expert_J]
  # At least sum_e ceil(size_e / block), the tiles that the groups fill:
  n_tiles = -(-(a + n_experts * (block - 1)) // block)
  tile_expert_Y = jnp.searchsorted(padded_ends_X, jnp.arange(n_tiles) * block, side="right")
  # Tiles past the last group hold only zero rows; any expert will do.
  return row_J, jnp.minimum(tile_expert_Y, n_experts - 1).astype(jnp.int32), n_tiles * block


def grouped_swiglu(
    x_JD: jax.Array, expert_J: jax.Array, w1_XDF, w3_XDF, w2_XFD, *, impl: str, block: int
) -> jax.Array:
  """w2_e(silu(w1_e x) * w3_e x) for each row x of `x_JD` and its expert e, rows sorted by
  expert."""
  n_experts = w1_XDF.shape[0]
  sizes_X = jnp.bincount(expert_J, length=n_experts).astype(jnp.int32)
  if impl == "ragged":
    mm = lambda x, w: jax.lax.ragged_dot(x, w, sizes_X)
    return mm(jax.nn.silu(mm(x_JD, w1_XDF)) * mm(x_JD, w3_XDF), w2_XFD)
  row_J, tile_expert_Y, rows = _tiles(expert_J, sizes_X, n_experts, block)
  d = x_JD.shape[1]
  x_YJD = jnp.zeros((rows, d), x_JD.dtype).at[row_J].set(x_JD).reshape(-1, block, d)
  mm = lambda x, w: jnp.einsum("yjd,ydf->yjf", x, w[tile_expert_Y])
  # Zero padding rows stay zero through the SwiGLU: silu(0) * 0 = 0.
  y_YJD = mm(jax.nn.silu(mm(x_YJD, w1_XDF)) * mm(x_YJD, w3_XDF), w2_XFD)
  return y_YJD.reshape(rows, -1)[row_J]


def dispatch(
    x_ND: jax.Array, experts_NK: jax.Array, gates_NK: jax.Array, w1_XDF, w3_XDF, w2_XFD, *,
    impl: str, block: int,
) -> jax.Array:
  """sum_k gates[n, k] * expert_{experts[n, k]}(x[n]), every assignment computed (dropless)."""
  n, k = experts_NK.shape
  expert_J = experts_NK.reshape(n * k)
  order_J = jnp.argsort(expert_J, stable=True)  # sorted position -> assignment (token * K + k)
  y_JD = grouped_swiglu(
      x_ND[order_J // k], expert_J[order_J], w1_XDF, w3_XDF, w2_XFD, impl=impl, block=block
  )
  y_NKD = jnp.zeros_like(y_JD).at[order_J].set(y_JD).reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", y_NKD, gates_NK.astype(y_NKD.dtype))


def resolve_impl(impl: str) -> str:
  if impl != "auto":
    return impl
  return "blocked" if jax.default_backend() == "cpu" else "ragged"


# The nnx.Intermediate a layer viewed with `record_balance_loss=True` sows: its balance loss.
BALANCE_LOSS = "balance_loss"


class MoE(nnx.Module):
  """Replaces a block's FFN. Parameters: `router` (D -> X, no bias), expert weights `w1`, `w3`
  (X, D, F) and `w2` (X, F, D), initialised as the dense FFN's w1, w3 and w2."""

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
    logits_NX = x_ND.astype(jnp.float32) @ self.router.kernel[...].astype(jnp.float32)
    experts_NK, gates_NK, balance = route(logits_NX, self.top_k)
    if self.record_balance_loss:
      self.sow(nnx.Intermediate, BALANCE_LOSS, balance, reduce_fn=lambda _, new: new)
    cast = lambda w: w[...].astype(self.dtype)
    out_ND = dispatch(
        x_ND.astype(self.dtype), experts_NK, gates_NK, cast(self.w1), cast(self.w3), cast(self.w2),
        impl=resolve_impl(self.impl), block=self.block,
    )
    return out_ND.reshape(b, t, d)
