"""AdamW as the reference trains memory models (spec 1.7), fused into one pass per parameter.

The value table is its own group: its own base learning rate (`memory.value_lr`) under the same
warmup/decay multiplier, and its own global-norm clip; every other parameter shares one clip.
Weight decay applies to every parameter, the table included, as in the reference.

The update is optax's `chain(clip_by_global_norm, scale_by_adam, add_decayed_weights,
scale_by_learning_rate)` followed by `apply_updates`, written as one elementwise function of
(gradient, parameter, moments): the moments are written in place, then the parameter is updated
from them. Through optax, XLA recomputed the new moments inside the parameter's fusion from the
old ones, so it copied both moments first, and it materialised the clipped gradient (the compiled
step's passes are counted in docs/results.md; `benchmarks/scaling.py` reports the floor).
Arithmetic is in float32; each result is rounded once to its stored dtype, so a bfloat16 table's
update is rounded once where optax rounded each stage.
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

B1, B2, EPS = 0.9, 0.95, 1e-8


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


def param_group(variable: nnx.Variable) -> str:
  return "values" if isinstance(variable, MemoryValues) else "dense"


def group_norms(grads) -> dict[str, jax.Array]:
  """Global gradient norm of the dense parameters and of the value table (before clipping)."""
  squares = {"dense": jnp.float32(0), "values": jnp.float32(0)}
  for variable in jax.tree.leaves(grads, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    g = variable[...] if isinstance(variable, nnx.Variable) else variable
    group = param_group(variable) if isinstance(variable, nnx.Variable) else "dense"
    squares[group] += jnp.sum(jnp.square(g.astype(jnp.float32)))
  return {k: jnp.sqrt(v) for k, v in squares.items()}


class AdamWState(NamedTuple):
  count: jax.Array  # int32: updates applied (a skipped, non-finite step is not one)
  mu: nnx.State  # first moments, in the parameters' structure, in `train.opt_state_dtype`
  nu: nnx.State  # second moments, likewise


class AdamW:
  """`init(params)` and `apply(grads, state, params, norms, finite) -> (params, state)`."""

  def __init__(self, cfg: Config):
    train = cfg.train
    self.multiplier = lr_multiplier(train.steps, train.warmup, train.lr_min_ratio, train.scheduler)
    self.base_lr = {"dense": train.lr, "values": cfg.model.memory.value_lr}
    self.clip = train.clip
    self.weight_decay = train.weight_decay
    self.state_dtype = init.DTYPES[train.opt_state_dtype]

  def init(self, params) -> AdamWState:
    zeros = lambda p: jnp.zeros(p.shape, self.state_dtype)
    return AdamWState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                      jax.tree.map(zeros, params))

  def apply(self, grads, state: AdamWState, params, norms: dict[str, jax.Array],
            finite: jax.Array | bool = True) -> tuple[nnx.State, AdamWState]:
    """One AdamW step from `grads` and their `group_norms`; where `finite` is false, the
    parameters and the state are returned unchanged."""
    finite = jnp.asarray(finite)
    count = optax.safe_increment(state.count)
    corrections = (1 - B1 ** count.astype(jnp.float32), 1 - B2 ** count.astype(jnp.float32))
    scalars = {}
    for group, norm in norms.items():
      # optax's clip_by_global_norm: gradients above the norm are scaled to it.
      scale = jnp.where(norm < self.clip, jnp.float32(1), self.clip / norm)
      lr = self.base_lr[group] * self.multiplier(state.count)
      scalars[group] = (scale, jnp.asarray(lr, jnp.float32))

    def leaf(p, g, m, v):
      scale, lr = scalars[param_group(p)]
      new_p, new_m, new_v = self._leaf(p[...], g[...], m[...], v[...], scale, lr, corrections,
                                       finite)
      return tuple(x.replace(value) for x, value in ((p, new_p), (m, new_m), (v, new_v)))

    is_var = lambda x: isinstance(x, nnx.Variable)
    triples = jax.tree.map(leaf, params, grads, state.mu, state.nu, is_leaf=is_var)
    pick = lambda i: jax.tree.map(lambda t: t[i], triples, is_leaf=lambda x: isinstance(x, tuple))
    new_count = jnp.where(finite, count, state.count)
    return pick(0), AdamWState(new_count, pick(1), pick(2))

  def _leaf(self, p, g, m, v, scale, lr, corrections, finite):
    f32 = jnp.float32
    g = g.astype(f32) * scale
    m32 = B1 * m.astype(f32) + (1 - B1) * g
    v32 = B2 * v.astype(f32) + (1 - B2) * jnp.square(g)
    if self.state_dtype == f32:
      # The stored moments are the float32 ones: materialise them (in place of the old ones) and
      # read them back for the parameter, rather than recomputing them from the old moments.
      m32, v32 = m_new, v_new = jax.lax.optimization_barrier(
          (jnp.where(finite, m32, m), jnp.where(finite, v32, v)))
    else:
      m32, v32 = jax.lax.optimization_barrier((m32, v32))
      m_new = jnp.where(finite, m32.astype(m.dtype), m)
      v_new = jnp.where(finite, v32.astype(v.dtype), v)
    update = (m32 / corrections[0]) / (jnp.sqrt(v32 / corrections[1]) + EPS)
    update = update + self.weight_decay * p.astype(f32)
    new_p = jnp.where(finite, (p.astype(f32) - lr * update).astype(p.dtype), p)
    return new_p, m_new, v_new


def make_optimizer(cfg: Config) -> AdamW:
  return AdamW(cfg)
