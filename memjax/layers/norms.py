"""RMSNorm, computed in float32 (Lingua's)."""

import jax
import jax.numpy as jnp
from flax import nnx

from memjax import sharding


def rms_normalise(x: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) over the last axis, computed in float32 and returned in float32."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **sharding.logical(sharding.NORM))

  def __call__(self, x: jax.Array) -> jax.Array:
    normed = rms_normalise(x, self.eps)
    return (normed * self.weight[...].astype(jnp.float32)).astype(x.dtype)
