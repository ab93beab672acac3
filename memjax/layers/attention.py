"""Causal grouped-query attention with interleaved-pair rotary embeddings, no biases.

Axis letters: B batch, T time, D model dim, H query heads, G key/value heads, Z head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.layers import init


def rope_angles(head_dim: int, max_seqlen: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin, each (T, Z/2), for frequencies theta**(-2i/Z), in float32."""
  freqs = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_TF = jnp.outer(jnp.arange(max_seqlen, dtype=jnp.float32), freqs)
  return jnp.cos(angles_TF), jnp.sin(angles_TF)


def apply_rope(x_BTHZ: jax.Array, cos_TF: jax.Array, sin_TF: jax.Array) -> jax.Array:
  """Rotates pairs (x[2i], x[2i+1]) by position-dependent angles (Meta's layout, not rotate-half)."""
  b, t, h, z = x_BTHZ.shape
  pairs = x_BTHZ.astype(jnp.float32).reshape(b, t, h, z // 2, 2)
  x0, x1 = pairs[..., 0], pairs[..., 1]
  cos, sin = cos_TF[None, :t, None, :], sin_TF[None, :t, None, :]
  rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return rotated.reshape(b, t, h, z).astype(x_BTHZ.dtype)


class Attention(nnx.Module):

  def __init__(
      self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, *, init_std: float,
      dtype, param_dtype, rngs: nnx.Rngs,
  ):
    self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
    linear = lambda d_in, d_out: nnx.Linear(
        d_in, d_out, use_bias=False, kernel_init=init.trunc_normal(init_std),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )
    self.wq = linear(dim, n_heads * head_dim)
    self.wk = linear(dim, n_kv_heads * head_dim)
    self.wv = linear(dim, n_kv_heads * head_dim)
    self.wo = linear(n_heads * head_dim, dim)

  def __call__(self, x_BTD: jax.Array, cos_TF: jax.Array, sin_TF: jax.Array) -> jax.Array:
    b, t, _ = x_BTD.shape
    q_BTHZ = apply_rope(self.wq(x_BTD).reshape(b, t, self.n_heads, self.head_dim), cos_TF, sin_TF)
    k_BTGZ = apply_rope(
        self.wk(x_BTD).reshape(b, t, self.n_kv_heads, self.head_dim), cos_TF, sin_TF
    )
    v_BTGZ = self.wv(x_BTD).reshape(b, t, self.n_kv_heads, self.head_dim)
    out_BTHZ = jax.nn.dot_product_attention(q_BTHZ, k_BTGZ, v_BTGZ, is_causal=True)
    return self.wo(out_BTHZ.reshape(b, t, self.n_heads * self.head_dim))
