"""Initialisers with the reference's conventions (spec 1.5)."""

import jax

DTYPES = {
    "float32": jax.numpy.float32,
    "bfloat16": jax.numpy.bfloat16,
    "float16": jax.numpy.float16,
    "float64": jax.numpy.float64,
}


def trunc_normal(std: float):
  """Normal(0, std) cut at +-3 std, as torch's trunc_normal_(std, a=-3std, b=3std)."""
  return jax.nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


def normal(std: float):
  return jax.nn.initializers.normal(stddev=std)


def uniform(bound: float):
  """Uniform(-bound, bound)."""

  def init(key, shape, dtype=jax.numpy.float32):
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

  return init
