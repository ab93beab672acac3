"""The decoder-only language model: pre-norm blocks whose FFN is SwiGLU or a memory layer.

Axis letters (see memjax): B batch, T time, D model dim, W vocabulary, C cache positions, Q rotary
frequencies.
Module and parameter names mirror the reference's state dict (spec 5.2), so checkpoints convert by
name: `tok_embeddings`, `layers.{i}.{attention,attention_norm,feed_forward,ffn_norm}`, `norm`,
`output`; a memory or PEER layer's `keys` and `query_proj` sit one level down, under
`product_keys`. The shared value table is one `MemoryValues` variable referenced by every memory
layer.

`Transformer.__call__` is the training forward over whole sequences. Decoding (memjax.generate)
uses `init_cache` and `extend`, which run new tokens against a key/value cache; memory layers read
per token and need no cache.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax import sharding
from memjax.config import ModelConfig
from memjax.layers import init
from memjax.layers.attention import Attention, KVCache, rope_angles
from memjax.layers.feed_forward import FeedForward
from memjax.layers.memory import MemoryValues, ProductKeyMemory, new_value_table
from memjax.layers.moe import BALANCE_LOSS, MoE
from memjax.layers.peer import PEER
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
        recompute_probs=cfg.remat == "attention",
    )
    if depth in cfg.memory.layers:
      self.feed_forward = ProductKeyMemory(cfg, values=values, rngs=rngs)
    elif depth in cfg.peer.layers:
      self.feed_forward = PEER(cfg, rngs=rngs)
    elif depth in cfg.moe.layers:
      hidden = cfg.expert_hidden_dim
      self.feed_forward = MoE(
          cfg,
          in_std=(base_std or cfg.dim**-0.5) / factor,
          out_std=(base_std or hidden**-0.5) / factor,
          rngs=rngs,
      )
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

  def __call__(self, x_BTD, cos_TQ, sin_TQ):
    h_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), cos_TQ, sin_TQ)
    return h_BTD + self.feed_forward(self.ffn_norm(h_BTD))

  def extend(self, x_BTD, cache: KVCache, start_B, cos_CQ, sin_CQ) -> tuple[jax.Array, KVCache]:
    """`__call__` for tokens that continue the rows held in `cache` (see `Attention.extend`)."""
    attended_BTD, cache = self.attention.extend(
        self.attention_norm(x_BTD), cache, start_B, cos_CQ, sin_CQ
    )
    h_BTD = x_BTD + attended_BTD
    return h_BTD + self.feed_forward(self.ffn_norm(h_BTD)), cache


@nnx.remat
def _recomputed_block(block: Block, x_BTD, cos_TQ, sin_TQ):
  """`block(x_BTD, ...)`, whose backward runs its forward again from `x_BTD` (model.remat=block):
  of its activations only the input is kept. What the block writes to its state (dropout RNG
  counts, captured intermediates and perturbations) comes out as from a plain call."""
  return block(x_BTD, cos_TQ, sin_TQ)


class DecodeCache(NamedTuple):
  """What decoding carries between calls: every block's keys and values, and each row's length.

  Row b holds tokens at positions [0, lengths_B[b]); rows advance independently, so a batch of
  prompts of different lengths needs no left padding and every row's positions start at 0.
  """

  layers: tuple[KVCache, ...]
  lengths_B: jax.Array  # int32

  @property
  def capacity(self) -> int:
    return self.layers[0].capacity


class Transformer(nnx.Module):
  """tokens (B, T) -> logits (B, T, W)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = init.DTYPES[cfg.dtype], init.DTYPES[cfg.param_dtype]
    std = cfg.dim**-0.5
    self.tok_embeddings = nnx.Embed(
        cfg.vocab_size, cfg.dim, embedding_init=init.trunc_normal(std),
        embedding_metadata=sharding.logical(sharding.VOCAB, sharding.EMBED),
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
        kernel_metadata=sharding.logical(sharding.EMBED, sharding.VOCAB),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    t = tokens_BT.shape[1]
    if t > self.cfg.max_seqlen:
      raise ValueError(f"sequence length {t} exceeds model.max_seqlen={self.cfg.max_seqlen}")
    # Constants under jit: recomputing beats carrying them as state.
    cos_TQ, sin_TQ = rope_angles(self.cfg.resolved_head_dim, t, self.cfg.rope_theta)
    h_BTD = self.tok_embeddings(tokens_BT)
    for block in self.layers:
      if self.cfg.remat == "block":
        h_BTD = _recomputed_block(block, h_BTD, cos_TQ, sin_TQ)
      else:
        h_BTD = block(h_BTD, cos_TQ, sin_TQ)
    return self.output(self.norm(h_BTD))

  def init_cache(self, batch_size: int, capacity: int) -> DecodeCache:
    """An empty cache for `batch_size` rows of up to `capacity` positions, in the compute dtype."""
    if batch_size < 1 or capacity < 1:
      raise ValueError(f"batch_size and capacity must be >= 1, got {batch_size} and {capacity}")
    cfg = self.cfg
    layer = KVCache.zeros(
        batch_size, capacity, cfg.resolved_kv_heads, cfg.resolved_head_dim, init.DTYPES[cfg.dtype]
    )
    # jnp arrays are immutable, so every block may start from the same zeros.
    return DecodeCache((layer,) * cfg.n_layers, jnp.zeros((batch_size,), jnp.int32))

  def extend(
      self, tokens_BT: jax.Array, cache: DecodeCache, n_valid_B: jax.Array | None = None
  ) -> tuple[jax.Array, DecodeCache]:
    """Logits (B, T, W) of tokens that continue each row of `cache`, and the cache with them added.

    Row b's tokens take positions cache.lengths_B[b] + t, so a prefill and the decode steps
    after it give the logits that `__call__` gives on the whole sequence. With `n_valid_B`, only
    the first n_valid_B[b] tokens of row b count (right padding of a ragged prompt batch): the
    row's length advances by that much, and the next call overwrites the padding's entries.
    The caller keeps lengths + T within the cache's capacity.
    """
    t = tokens_BT.shape[1]
    cos_CQ, sin_CQ = rope_angles(self.cfg.resolved_head_dim, cache.capacity, self.cfg.rope_theta)
    start_B = cache.lengths_B
    h_BTD = self.tok_embeddings(tokens_BT)
    layers = []
    for block, layer_cache in zip(self.layers, cache.layers, strict=True):
      h_BTD, layer_cache = block.extend(h_BTD, layer_cache, start_B, cos_CQ, sin_CQ)
      layers.append(layer_cache)
    advance_B = t if n_valid_B is None else n_valid_B.astype(start_B.dtype)
    return self.output(self.norm(h_BTD)), DecodeCache(tuple(layers), start_B + advance_B)


def split_for_inference(model: Transformer) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph and state of `model` in eval mode (dropout off) without the intermediates a forward
  recorded on it, for jitted inference functions that rebuild it with `nnx.merge`. `model`
  itself is left as it is."""
  view = nnx.view(model, deterministic=True, raise_if_not_found=False)
  nnx.pop(view, nnx.Intermediate)  # removed from the view's modules only
  return nnx.split(view)


def balance_loss(intermediates: nnx.State) -> jax.Array:
  """Sum of the MoE layers' load-balancing losses recorded under `nnx.capture(view,
  nnx.Intermediate)` of a view with `record_balance_loss=True`; 0 without MoE layers."""
  losses = [
      v.get_value() for path, v in nnx.to_flat_state(intermediates) if path[-1] == BALANCE_LOSS
  ]
  return sum(losses, jnp.float32(0))


def parameter_counts(model: Transformer) -> dict[str, int]:
  """Parameters in all, and those a token uses (`active`): a memory layer reads H*K rows of its
  table, an MoE layer runs k of its X experts, a PEER layer H*K (u, v) pairs. A shared table
  counts once in the total and once per reading layer in the active count. `model` may be
  abstract (nnx.eval_shape)."""
  size = lambda v: math.prod(v.get_value().shape)
  total = sum(size(v) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  sparse: dict[int, int] = {}  # id of a table or expert weight -> its size, counted once
  used = 0
  for block in model.layers:
    ffn = block.feed_forward
    if isinstance(ffn, ProductKeyMemory):
      sparse[id(ffn.values)] = size(ffn.values)
      used += ffn.product_keys.heads * ffn.product_keys.knn * ffn.values.get_value().shape[1]
    elif isinstance(ffn, MoE):
      for w in (ffn.w1, ffn.w3, ffn.w2):
        sparse[id(w)] = size(w)
        used += size(w) // w.get_value().shape[0] * ffn.top_k
    elif isinstance(ffn, PEER):
      for table in (ffn.values_u.embedding, ffn.values_v.embedding):
        sparse[id(table)] = size(table)
        used += ffn.product_keys.heads * ffn.product_keys.knn * table.get_value().shape[1]
  return {"total": int(total), "active": int(total - sum(sparse.values()) + used)}


def cross_entropy(logits_BTW: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Mean token negative log-likelihood, with the log-softmax in float32."""
  logp_BTW = jax.nn.log_softmax(logits_BTW.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp_BTW, targets_BT[..., None], axis=-1))
