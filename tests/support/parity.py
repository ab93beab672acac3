"""Parity with the PyTorch oracle (`memjax.interop.torch_reference`): memjax modules with random
weights, the oracle's gradients by reference name, and the error measure the tolerances bound."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn


def build_random(factory, seed: int):
  """The module `factory()` builds, with every parameter drawn from numpy instead of its init.

  Built abstractly, so no PRNG program is compiled (the slow part of building small modules on
  CPU). Scales keep scores O(1); biases and norm weights are random so that parity sees them.
  """
  graphdef, state = nnx.split(nnx.eval_shape(factory))
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(state):
    shape, dtype = var.get_value().shape, var.get_value().dtype
    if isinstance(var, nnx.RngKey):
      var.set_value(jax.random.key(seed))
    elif isinstance(var, nnx.RngCount):
      var.set_value(jnp.zeros(shape, dtype))
    else:
      name = path[-1]
      if name == "kernel":  # (in, out)
        value = rng.standard_normal(shape) * shape[0] ** -0.5
      elif name == "keys":  # (H, 2, M, E)
        value = rng.standard_normal(shape) * shape[-1] ** -0.5
      elif name == "bias":
        value = 0.5 * rng.standard_normal(shape)
      elif name == "weight":  # RMSNorm
        value = 1 + 0.2 * rng.standard_normal(shape)
      else:  # embeddings and value tables
        value = rng.standard_normal(shape)
      var.set_value(jnp.asarray(value, dtype))
  return nnx.merge(graphdef, state)


def oracle_grads(oracle: nn.Module) -> dict[str, np.ndarray]:
  """Gradients by reference name; a shared table appears once, under its first name."""
  return {n: p.grad.detach().numpy() for n, p in oracle.named_parameters() if p.grad is not None}


def relative_error(actual, expected) -> float:
  """max|actual - expected| / max|expected|: a relative error that ignores tiny entries."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected.detach() if torch.is_tensor(expected) else expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))
