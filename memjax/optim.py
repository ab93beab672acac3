"""AdamW as the reference trains memory models (spec 1.7).

The value table is its own group: its own base learning rate (`memory.value_lr`) under the same
warmup/decay multiplier, and its own global-norm clip; every other parameter shares one clip.
Weight decay applies to every parameter, the table included, as in the reference.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from memjax.config import Config
from memjax.layers.memory import MemoryValues


def lr_multiplier(steps: int, warmup: int, min_ratio: float) -> optax.Schedule:
  """0 -> 1 linearly over `warmup`, then linearly down to `min_ratio` at `steps`."""
  return optax.join_schedules(
      [
          optax.linear_schedule(0.0, 1.0, max(warmup, 1)),
          optax.linear_schedule(1.0, min_ratio, max(steps - warmup, 1)),
      ],
      boundaries=[warmup],
  )


def param_group(variable: nnx.Variable) -> str:
  return "values" if isinstance(variable, MemoryValues) else "dense"


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
  train = cfg.train
  multiplier = lr_multiplier(train.steps, train.warmup, train.lr_min_ratio)

  def group(base_lr: float) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train.clip),
        optax.adamw(
            lambda step: base_lr * multiplier(step),
            b1=0.9, b2=0.95, eps=1e-8, weight_decay=train.weight_decay,
        ),
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
