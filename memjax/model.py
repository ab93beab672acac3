"""The decoder-only language model: pre-norm blocks whose FFN is SwiGLU or a memory layer.

Axis letters: B batch, T time, D model dim, W vocabulary.
Module and parameter names mirror the reference's state dict (spec 5.2), so checkpoints convert by
name: `tok_embeddings`, `layers.{i}.{attention,attention_norm,feed_forward,ffn_norm}`, `norm`,
`output`. The shared value table is one `MemoryValues` variable referenced by every memory layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import ModelConfig
from memjax.layers import init
from memjax.layers.attention import Attention, rope_angles
from memjax.layers.feed_forward import FeedForward
from memjax.layers.memory import MemoryValues, ProductKeyMemory, new_value_table
from memjax.layers.norms import RMSNorm


def depth_factor(cfg: ModelConfig, depth: int) -> float:
  """Lingua's `init_std_factor`: divides the init std of block `depth` (not of memory layers)."""
  return {
      "disabled": 1.0,
      "current_depth": (2 * (depth + 1)) ** 0.5,
      "global_depth": (2 * (cfg.n_layers + 1)) ** 0.5,
      "dim_ratio": cfg.dim / 4096,
  }[cfg.init_std_factor]


class Block(nnx.Module):
  """h = x + attention(norm(x)); out = h + feed_forward(norm(h))."""

  def __init__(
      self, cfg: ModelConfig, depth: int, *, values: MemoryValues | None, rngs: nnx.Rngs
  ):
    dtype, param_dtype = init.DTYPES[cfg.dtype], init.DTYPES[cfg.param_dtype]
    factor = depth_factor(cfg, depth)
    base_std = cfg.init_base_std
    self.attention = Attention(
        cfg.dim, cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim,
        init_std=(base_std or cfg.dim**-0.5) / factor,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )
    if depth in cfg.memory.layers:
      self.feed_forward = ProductKeyMemory(cfg, values=values, rngs=rngs)
    else:
      hidden = cfg.ffn_hidden_dim
      self.feed_forward = FeedForward(
          cfg.dim, hidden,
          in_std=(base_std or cfg.dim**-0.5) / factor,
          out_std=(base_std or hidden**-0.5) / factor,
          dtype=dtype, param_dtype=param_dtype, rngs=rngs,
      )
    self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=param_dtype)
    self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=param_dtype)

  def __call__(self, x_BTD, cos_TF, sin_TF):
    h_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), cos_TF, sin_TF)
    return h_BTD + self.feed_forward(self.ffn_norm(h_BTD))


class Transformer(nnx.Module):
  """tokens (B, T) -> logits (B, T, W)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = init.DTYPES[cfg.dtype], init.DTYPES[cfg.param_dtype]
    std = cfg.dim**-0.5
    self.tok_embeddings = nnx.Embed(
        cfg.vocab_size, cfg.dim, embedding_init=init.trunc_normal(std),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )
    shared = (
        new_value_table(cfg, rngs) if cfg.memory.enabled and cfg.memory.share_values else None
    )
    self.layers = nnx.List(
        [Block(cfg, depth, values=shared, rngs=rngs) for depth in range(cfg.n_layers)]
    )
    self.norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=param_dtype)
    self.output = nnx.Linear(
        cfg.dim, cfg.vocab_size, use_bias=False, kernel_init=init.trunc_normal(std),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    t = tokens_BT.shape[1]
    if t > self.cfg.max_seqlen:
      raise ValueError(f"sequence length {t} exceeds model.max_seqlen={self.cfg.max_seqlen}")
    # Constants under jit: recomputing beats carrying them as state.
    cos_TF, sin_TF = rope_angles(self.cfg.resolved_head_dim, t, self.cfg.rope_theta)
    h_BTD = self.tok_embeddings(tokens_BT)
    for block in self.layers:
      h_BTD = block(h_BTD, cos_TF, sin_TF)
    return self.output(self.norm(h_BTD))


def cross_entropy(logits_BTW: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Mean token negative log-likelihood, with the log-softmax in float32."""
  logp_BTW = jax.nn.log_softmax(logits_BTW.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp_BTW, targets_BT[..., None], axis=-1))
