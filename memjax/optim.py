"""AdamW as the reference trains memory models (spec 1.7), fused into one pass per parameter.

The value table is its own group: its own base learning rate (`optim.value_lr`) under the same
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

A table's gradient may come as the rows a step touched (`RowGrads`) rather than an (S, V) array.
With the dense update, every row still takes its AdamW step: untouched rows with a zero gradient
(a pass over the table and its moments that reads no gradient), then the touched rows are
overwritten with their full update. With `optim.table_update: sparse` (the sparse Adam that XLM
used for product-key memories), only the touched rows and their moments are updated: untouched
rows get no momentum step and no weight decay.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from memjax.config import Config
from memjax.layers import init
from memjax.layers.memory import MemoryValues
from memjax.ops.table_rows import set_rows

B1, B2, EPS = 0.9, 0.95, 1e-8


def lr_multiplier(
    steps: int, warmup: int, min_ratio: float, scheduler: str = "linear",
    cycle_length: float = 1.0, cosine_theta: float = 1.0,
) -> optax.Schedule:
  """0 -> 1 linearly over `warmup`, then down to `min_ratio` at `steps`, linearly or cosine.

  The cosine is the reference's: at progress s in [0, 1] after warmup, min_ratio + (1 -
  min_ratio) * (1 + cos(pi * s**cosine_theta / cycle_length)) / 2; the defaults make it one
  half-cycle (optax's cosine decay).
  """
  decay_steps = max(steps - warmup, 1)
  if scheduler == "linear":
    decay = optax.linear_schedule(1.0, min_ratio, decay_steps)
  elif scheduler == "cosine":
    def decay(count):
      s = jnp.clip(count / decay_steps, 0.0, 1.0)
      cosine = jnp.cos(jnp.pi * s**cosine_theta / cycle_length)
      return min_ratio + 0.5 * (1 - min_ratio) * (1 + cosine)
  else:
    raise ValueError(f"optim.scheduler: must be 'linear' or 'cosine', got {scheduler!r}")
  return optax.join_schedules(
      [optax.linear_schedule(0.0, 1.0, max(warmup, 1)), decay], boundaries=[warmup]
  )


def config_lr_multiplier(cfg: Config) -> optax.Schedule:
  """`lr_multiplier` of a run's `train.steps` and `optim` section."""
  o = cfg.optim
  return lr_multiplier(cfg.train.steps, o.warmup, o.lr_min_ratio, o.scheduler, o.cycle_length,
                       o.cosine_theta)


# The config fields the learning rates' schedule is made of.
SCHEDULE_FIELDS = (
    "train.steps", "optim.lr", "optim.value_lr", "optim.scheduler", "optim.warmup",
    "optim.lr_min_ratio", "optim.cycle_length", "optim.cosine_theta",
)


def schedule_change(saved: Mapping, cfg: Config, step: int) -> str | None:
  """One line naming the `SCHEDULE_FIELDS` that `cfg` changes from `saved` (the plain config of
  the checkpoint at `step`), with the next step's learning rates under each; None when none
  changed. (The schedule is a function of the step: changing train.steps stretches it, and the
  rate can jump at the resume.)"""
  old, new = {}, {}
  for field in SCHEDULE_FIELDS:
    section, name = field.split(".")
    new[field] = getattr(getattr(cfg, section), name)
    old[field] = saved.get(section, {}).get(name, new[field])

  def rates(v):
    multiplier = lr_multiplier(v["train.steps"], v["optim.warmup"], v["optim.lr_min_ratio"],
                               v["optim.scheduler"], v["optim.cycle_length"],
                               v["optim.cosine_theta"])(step)
    return float(v["optim.lr"] * multiplier), float(v["optim.value_lr"] * multiplier)

  changed = [f"{k} {old[k]} -> {new[k]}" for k in SCHEDULE_FIELDS if old[k] != new[k]]
  if not changed:
    return None
  (lr_old, values_old), (lr_new, values_new) = rates(old), rates(new)
  line = (f"schedule changed since the checkpoint of step {step}: {', '.join(changed)}; lr at "
          f"step {step + 1}: {lr_old:.3g} -> {lr_new:.3g}")
  if cfg.model.memory.enabled:
    line += f" (value table {values_old:.3g} -> {values_new:.3g})"
  return line


def param_group(variable: nnx.Variable) -> str:
  return "values" if isinstance(variable, MemoryValues) else "dense"


class RowGrads(NamedTuple):
  """A table's gradient as the rows it is nonzero on: `rows` (U,) int32, distinct, padded with
  the table's row count (ignored); `grads` (U, V) their gradients (`memjax.ops.table_rows`)."""
  rows: jax.Array
  grads: jax.Array


def group_norms(grads, row_grads: Mapping[tuple, RowGrads] | None = None) -> dict[str, jax.Array]:
  """Global gradient norm of the dense parameters and of the value table (before clipping);
  tables updated row-wise count through their `row_grads`."""
  sum_squares = lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)))
  squares = {"dense": jnp.float32(0), "values": jnp.float32(0)}
  for variable in jax.tree.leaves(grads, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    g = variable[...] if isinstance(variable, nnx.Variable) else variable
    group = param_group(variable) if isinstance(variable, nnx.Variable) else "dense"
    squares[group] += sum_squares(g)
  for row_grad in (row_grads or {}).values():
    squares["values"] += sum_squares(row_grad.grads)
  return {k: jnp.sqrt(v) for k, v in squares.items()}


class AdamWState(NamedTuple):
  count: jax.Array  # int32: updates applied (a skipped, non-finite step is not one)
  mu: nnx.State  # first moments, in the parameters' structure, in `optim.state_dtype`
  nu: nnx.State  # second moments, likewise


class AdamW:
  """`init(params)` and `apply(grads, state, params, norms, finite) -> (params, state)`."""

  def __init__(self, cfg: Config):
    optim = cfg.optim
    self.multiplier = config_lr_multiplier(cfg)
    self.base_lr = {"dense": optim.lr, "values": optim.value_lr}
    self.clip = optim.clip
    self.weight_decay = optim.weight_decay
    self.state_dtype = init.DTYPES[optim.state_dtype]
    self.rows_only = optim.table_update == "sparse"
    self.impl = cfg.model.memory.impl  # whose kernel writes a table's rows back

  def init(self, params) -> AdamWState:
    zeros = lambda p: jnp.zeros(p.shape, self.state_dtype)
    return AdamWState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                      jax.tree.map(zeros, params))

  def apply(self, grads, state: AdamWState, params, norms: dict[str, jax.Array],
            finite: jax.Array | bool = True,
            row_grads: Mapping[tuple, RowGrads] | None = None) -> tuple[nnx.State, AdamWState]:
    """One AdamW step from `grads` and their `group_norms`; where `finite` is false, the
    parameters and the state are returned unchanged.

    `row_grads` maps a table's path to its gradient as `RowGrads` (`grads` has no entry for
    it). With the sparse update its listed rows and their moments are updated and every other
    row is left as it is, bit for bit; with the dense one every row is, as from the (S, V)
    gradient that is zero off the listed rows."""
    row_grads = row_grads or {}
    finite = jnp.asarray(finite)
    count = optax.safe_increment(state.count)
    corrections = (1 - B1 ** count.astype(jnp.float32), 1 - B2 ** count.astype(jnp.float32))
    scalars = {}
    for group, norm in norms.items():
      # optax's clip_by_global_norm: gradients above the norm are scaled to it.
      scale = jnp.where(norm < self.clip, jnp.float32(1), self.clip / norm)
      lr = self.base_lr[group] * self.multiplier(state.count)
      scalars[group] = (scale, jnp.asarray(lr, jnp.float32))

    flat_grads = dict(nnx.to_flat_state(grads))
    new_params, new_mu, new_nu = {}, {}, {}
    for (path, p), (_, m), (_, v) in zip(*map(nnx.to_flat_state, (params, state.mu, state.nu))):
      hyper = (*scalars[param_group(p)], corrections, finite)
      if path in row_grads:
        rows, g = row_grads[path]
        if self.rows_only:
          take = lambda x: jnp.take(x[...], rows, axis=0, mode="clip")
          updated = self._leaf(take(p), g, take(m), take(v), *hyper)
          p_new, m_new, v_new = (
              set_rows(x[...], rows, rows_new, self.impl) for x, rows_new in zip((p, m, v), updated))
        else:
          p_new, m_new, v_new = self._dense_from_rows(p[...], rows, g, m[...], v[...], *hyper)
      else:
        p_new, m_new, v_new = self._leaf(p[...], flat_grads[path][...], m[...], v[...], *hyper)
      new_params[path], new_mu[path], new_nu[path] = p.replace(p_new), m.replace(m_new), v.replace(v_new)
    new_count = jnp.where(finite, count, state.count)
    state = AdamWState(new_count, nnx.from_flat_state(new_mu), nnx.from_flat_state(new_nu))
    return nnx.from_flat_state(new_params), state

  def _leaf(self, p, g, m, v, scale, lr, corrections, finite):
    """The fused update of one parameter: (new p, new m, new v)."""
    m32, v32 = self._moments(g, m, v, scale)
    if self.state_dtype == jnp.float32:
      # The stored moments are the float32 ones: materialise them (in place of the old ones) and
      # read them back for the parameter, rather than recomputing them from the old moments.
      m32, v32 = m_new, v_new = jax.lax.optimization_barrier(
          (jnp.where(finite, m32, m), jnp.where(finite, v32, v)))
    else:
      m32, v32 = jax.lax.optimization_barrier((m32, v32))
      m_new = jnp.where(finite, m32.astype(m.dtype), m)
      v_new = jnp.where(finite, v32.astype(v.dtype), v)
    return self._param(p, m32, v32, lr, corrections, finite), m_new, v_new

  def _dense_from_rows(self, p, rows, g, m, v, scale, lr, corrections, finite):
    """`_leaf` from the gradient's nonzero rows: the same values, and with float32 moments no
    (S, V) gradient and no whole-table temporary.

    Each moment is stepped with a zero gradient and its touched rows are overwritten in one
    row-write call, in place; the parameter's pass reads the new moments from it. (Fused into
    XLA passes instead, the zero-gradient step is recomputed inside the parameter's pass from
    the old moments, which XLA then copies to keep alive.)"""
    if self.state_dtype != jnp.float32:  # the parameter's step uses the unrounded moments
      g_dense = set_rows(jnp.zeros(p.shape, g.dtype), rows, g, self.impl)
      return self._leaf(p, g_dense, m, v, scale, lr, corrections, finite)
    take = lambda x: jnp.take(x, rows, axis=0, mode="clip")
    m_rows, v_rows = self._moments(g, take(m), take(v), scale)
    m_new, v_new = (
        set_rows(old, rows, jnp.where(finite, new, take(old)), self.impl,
                 factor=jnp.where(finite, decay, jnp.float32(1)))
        for old, new, decay in ((m, m_rows, B1), (v, v_rows, B2)))
    return self._param(p, m_new, v_new, lr, corrections, finite), m_new, v_new

  @staticmethod
  def _moments(g, m, v, scale):
    """The new moments in float32; `g=None` is a zero gradient, never materialised (the same
    values: adding (1 - B) * 0 changes nothing)."""
    f32 = jnp.float32
    m32, v32 = B1 * m.astype(f32), B2 * v.astype(f32)
    if g is not None:
      g = g.astype(f32) * scale
      m32, v32 = m32 + (1 - B1) * g, v32 + (1 - B2) * jnp.square(g)
    return m32, v32

  def _param(self, p, m32, v32, lr, corrections, finite):
    f32 = jnp.float32
    update = (m32 / corrections[0]) / (jnp.sqrt(v32 / corrections[1]) + EPS)
    update = update + self.weight_decay * p.astype(f32)
    return jnp.where(finite, (p.astype(f32) - lr * update).astype(p.dtype), p)


def make_optimizer(cfg: Config) -> AdamW:
  return AdamW(cfg)
