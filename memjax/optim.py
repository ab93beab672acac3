"""AdamW as the reference trains memory models (spec 1.7).

The value table is its own group: its own base learning rate (`memory.value_lr`) under the same
warmup/decay multiplier, and its own global-norm clip; every other parameter shares one clip.
Weight decay applies to every parameter, the table included, as in the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from memjax.config import Config
from memjax.layers import init
from memjax.layers.memory import MemoryValues


def lr_multiplier(
    steps: int, warmup: int, min_ratio: float, scheduler: str = "linear"
) -> optax.Schedule:
  """0 -> 1 linearly over `warmup`, then down to `min_ratio` at `steps`, linearly or cosine."""
  decay_steps = max(steps - warmup, 1)
  if scheduler == "linear":
    decay = optax.linear_schedule(1.0, min_ratio, decay_steps)
  elif scheduler == "cosine":
    decay = optax.cosine_decay_schedule(1.0, decay_steps, alpha=min_ratio)
  else:
    raise ValueError(f"train.scheduler: must be 'linear' or 'cosine', got {scheduler!r}")
  return optax.join_schedules(
      [optax.linear_schedule(0.0, 1.0, max(warmup, 1)), decay], boundaries=[warmup]
  )


class AdamState(NamedTuple):
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam(b1: float, b2: float, eps: float, state_dtype: jnp.dtype) -> optax.GradientTransformation:
  """Adam's scaling with both moments stored in `state_dtype` and computed in float32."""

  def init_fn(params):
    zeros = lambda p: jnp.zeros(p.shape, state_dtype)
    return AdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    f32 = lambda x: x.astype(jnp.float32)
    mu = jax.tree.map(lambda g, m: b1 * f32(m) + (1 - b1) * f32(g), updates, state.mu)
    nu = jax.tree.map(lambda g, v: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), updates, state.nu)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    scaled = jax.tree.map(
        lambda m, v, g: (m / (jnp.sqrt(v) + eps)).astype(g.dtype), mu_hat, nu_hat, updates
    )
    store = lambda x: x.astype(state_dtype)
    return scaled, AdamState(count, jax.tree.map(store, mu), jax.tree.map(store, nu))

  return optax.GradientTransformation(init_fn, update_fn)


def param_group(variable: nnx.Variable) -> str:
  return "values" if isinstance(variable, MemoryValues) else "dense"


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
  train = cfg.train
  multiplier = lr_multiplier(train.steps, train.warmup, train.lr_min_ratio, train.scheduler)
  state_dtype = init.DTYPES[train.opt_state_dtype]

  def group(base_lr: float) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train.clip),
        scale_by_adam(0.9, 0.95, 1e-8, state_dtype),
        optax.add_decayed_weights(train.weight_decay),
        optax.scale_by_learning_rate(lambda step: base_lr * multiplier(step)),
    )

  def labels(params):
    # Keep each Variable node, labelled inside, so the label tree has the parameters' structure.
    return jax.tree.map(
        lambda v: jax.tree.map(lambda _: param_group(v), v),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )

  return optax.multi_transform(
      {"dense": group(train.lr), "values": group(cfg.model.memory.value_lr)}, labels
  )
