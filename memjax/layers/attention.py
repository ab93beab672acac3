"""Causal grouped-query attention with interleaved-pair rotary embeddings, no biases.

Training runs `Attention.__call__` over whole sequences. Decoding runs `Attention.extend`: new
tokens at each row's own positions, their keys and values written into a `KVCache`.

Axis letters (see memjax): B batch, T time, D model dim, H query heads, G key/value heads, Z head
dim, C cache positions (its capacity), Q rotary frequencies (Z/2).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax import sharding
from memjax.layers import init


def rope_angles(head_dim: int, max_seqlen: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin, each (T, Z/2), for frequencies theta**(-2i/Z), in float32."""
  freqs = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_TQ = jnp.outer(jnp.arange(max_seqlen, dtype=jnp.float32), freqs)
  return jnp.cos(angles_TQ), jnp.sin(angles_TQ)


def apply_rope(x_BTHZ: jax.Array, cos_TQ: jax.Array, sin_TQ: jax.Array) -> jax.Array:
  """Rotates pairs (x[2i], x[2i+1]) by position-dependent angles (Meta's layout, not rotate-half).

  Position t of every row takes row t of the tables.
  """
  t = x_BTHZ.shape[1]
  return _rotate_pairs(x_BTHZ, cos_TQ[None, :t, None, :], sin_TQ[None, :t, None, :])


def apply_rope_at(x_BTHZ: jax.Array, cos_BTQ: jax.Array, sin_BTQ: jax.Array) -> jax.Array:
  """`apply_rope` with angles per row and step: decoding rows each have their own positions."""
  return _rotate_pairs(x_BTHZ, cos_BTQ[:, :, None, :], sin_BTQ[:, :, None, :])


def _rotate_pairs(x_BTHZ: jax.Array, cos_BT1Q: jax.Array, sin_BT1Q: jax.Array) -> jax.Array:
  b, t, h, z = x_BTHZ.shape
  pairs = x_BTHZ.astype(jnp.float32).reshape(b, t, h, z // 2, 2)
  x0, x1 = pairs[..., 0], pairs[..., 1]
  rotated = jnp.stack([x0 * cos_BT1Q - x1 * sin_BT1Q, x0 * sin_BT1Q + x1 * cos_BT1Q], axis=-1)
  return rotated.reshape(b, t, h, z).astype(x_BTHZ.dtype)


class KVCache(NamedTuple):
  """One attention layer's rotated keys and its values at positions [0, C) of each row.

  A plain pytree: decoding passes it in and gets the updated one back, so a jitted loop carries
  it like any other array. Which positions are filled is the caller's record (see
  `memjax.model.DecodeCache`); entries past a row's length are stale and never attended to.
  """

  k_BCGZ: jax.Array
  v_BCGZ: jax.Array

  @classmethod
  def zeros(cls, batch: int, capacity: int, n_kv_heads: int, head_dim: int, dtype) -> KVCache:
    shape = (batch, capacity, n_kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  @property
  def capacity(self) -> int:
    return self.k_BCGZ.shape[1]


class Attention(nnx.Module):

  def __init__(
      self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, *, init_std: float,
      dtype, param_dtype, rngs: nnx.Rngs, recompute_probs: bool = False,
  ):
    """`recompute_probs`: the backward recomputes the (B, H, T, T) attention probabilities from
    the queries, keys and values instead of keeping them (model.remat=attention)."""
    self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
    self.recompute_probs = recompute_probs
    linear = lambda d_in, d_out, axes: nnx.Linear(
        d_in, d_out, use_bias=False, kernel_init=init.trunc_normal(init_std),
        kernel_metadata=sharding.logical(*axes), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )
    self.wq = linear(dim, n_heads * head_dim, (sharding.EMBED, sharding.HEADS))
    self.wk = linear(dim, n_kv_heads * head_dim, (sharding.EMBED, sharding.KV_HEADS))
    self.wv = linear(dim, n_kv_heads * head_dim, (sharding.EMBED, sharding.KV_HEADS))
    self.wo = linear(n_heads * head_dim, dim, (sharding.HEADS, sharding.EMBED))

  def __call__(self, x_BTD: jax.Array, cos_TQ: jax.Array, sin_TQ: jax.Array) -> jax.Array:
    b, t, _ = x_BTD.shape
    q_BTHZ = apply_rope(self.wq(x_BTD).reshape(b, t, self.n_heads, self.head_dim), cos_TQ, sin_TQ)
    k_BTGZ = apply_rope(
        self.wk(x_BTD).reshape(b, t, self.n_kv_heads, self.head_dim), cos_TQ, sin_TQ
    )
    v_BTGZ = self.wv(x_BTD).reshape(b, t, self.n_kv_heads, self.head_dim)
    attend = functools.partial(jax.nn.dot_product_attention, is_causal=True)
    if self.recompute_probs:
      attend = jax.checkpoint(attend)  # keeps its inputs alone
    out_BTHZ = attend(q_BTHZ, k_BTGZ, v_BTGZ)
    return self.wo(out_BTHZ.reshape(b, t, self.n_heads * self.head_dim))

  def extend(
      self, x_BTD: jax.Array, cache: KVCache, start_B: jax.Array, cos_CQ: jax.Array,
      sin_CQ: jax.Array,
  ) -> tuple[jax.Array, KVCache]:
    """Attention for T new tokens per row that continue what `cache` holds.

    Row b's tokens take positions start_B[b] + t: their keys and values are written there, and
    each attends to every cache position at or before its own. cos_CQ and sin_CQ are the rotary
    tables for all C cache positions. The caller keeps start_B + T within C (writes past the
    end are dropped).
    """
    b, t, _ = x_BTD.shape
    pos_BT = start_B[:, None] + jnp.arange(t, dtype=start_B.dtype)
    cos_BTQ, sin_BTQ = cos_CQ[pos_BT], sin_CQ[pos_BT]
    q_BTHZ = apply_rope_at(
        self.wq(x_BTD).reshape(b, t, self.n_heads, self.head_dim), cos_BTQ, sin_BTQ
    )
    k_BTGZ = apply_rope_at(
        self.wk(x_BTD).reshape(b, t, self.n_kv_heads, self.head_dim), cos_BTQ, sin_BTQ
    )
    v_BTGZ = self.wv(x_BTD).reshape(b, t, self.n_kv_heads, self.head_dim)
    rows_B1 = jnp.arange(b)[:, None]
    cache = KVCache(
        cache.k_BCGZ.at[rows_B1, pos_BT].set(k_BTGZ, mode="drop"),
        cache.v_BCGZ.at[rows_B1, pos_BT].set(v_BTGZ, mode="drop"),
    )
    # Causal over absolute positions; also hides whatever stale entries lie past a row's length.
    visible_BTC = jnp.arange(cache.capacity) <= pos_BT[:, :, None]
    out_BTHZ = jax.nn.dot_product_attention(
        q_BTHZ, cache.k_BCGZ, cache.v_BCGZ, mask=visible_BTC[:, None]
    )
    return self.wo(out_BTHZ.reshape(b, t, self.n_heads * self.head_dim)), cache
