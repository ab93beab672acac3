"""The SwiGLU FFN of the dense blocks: w2(silu(w1 x) * w3 x), no biases."""

import jax
from flax import nnx

from memjax import sharding
from memjax.layers import init


class FeedForward(nnx.Module):

  def __init__(
      self, dim: int, hidden_dim: int, *, in_std: float, out_std: float, dtype, param_dtype,
      rngs: nnx.Rngs,
  ):
    linear = lambda d_in, d_out, std, axes: nnx.Linear(
        d_in, d_out, use_bias=False, kernel_init=init.trunc_normal(std),
        kernel_metadata=sharding.logical(*axes), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
    )
    self.w1 = linear(dim, hidden_dim, in_std, (sharding.EMBED, sharding.MLP))
    self.w3 = linear(dim, hidden_dim, in_std, (sharding.EMBED, sharding.MLP))
    self.w2 = linear(hidden_dim, dim, out_std, (sharding.MLP, sharding.EMBED))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    return self.w2(jax.nn.silu(self.w1(x_BTD)) * self.w3(x_BTD))
