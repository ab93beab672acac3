"""AdamW with the value table in its own group (spec 1.7)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from memjax import config_loading, optim
from memjax.layers.memory import MemoryValues
from memjax.model import Transformer


def setup(**optimizer):
  cfg = config_loading.load("tiny", ["model.n_layers=2", "model.memory.layers=[1]", "model.dim=32"])
  cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **optimizer))
  params = nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(0)), nnx.Param)
  return cfg, params


def split_by_group(tree):
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  values = [v[...] for v in leaves if isinstance(v, MemoryValues)]
  dense = [v[...] for v in leaves if not isinstance(v, MemoryValues)]
  return values, dense


def test_schedule_warms_up_then_decays_linearly_to_the_floor():
  m = optim.lr_multiplier(steps=100, warmup=10, min_ratio=0.01)
  np.testing.assert_allclose([m(0), m(5), m(10), m(55), m(100)], [0, 0.5, 1, 0.505, 0.01], atol=1e-6)


def step(tx, grads, state, params):
  """One update: (parameter deltas, new parameters, new state)."""
  new, state = tx.apply(grads, state, params, optim.group_norms(grads))
  return jax.tree.map(lambda a, b: a - b, new, params), new, state


def test_value_table_uses_its_own_learning_rate():
  cfg, params = setup(warmup=0, weight_decay=0.0, lr=1e-4)
  tx = optim.make_optimizer(cfg)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _, _ = step(tx, grads, tx.init(params), params)
  values, dense = split_by_group(updates)
  assert len(values) == 1
  # Adam's first step moves every coordinate by lr (sign of the gradient).
  np.testing.assert_allclose(values[0], -cfg.optim.value_lr, rtol=1e-4)
  for u in dense:
    np.testing.assert_allclose(u, -1e-4, rtol=1e-3)


def test_clipping_is_separate_for_the_table():
  cfg, params = setup(warmup=0, weight_decay=0.0, clip=1.0)
  tx = optim.make_optimizer(cfg)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  huge = jax.tree.map(
      lambda v: jax.tree.map(lambda g: g * 1e6, v) if isinstance(v, MemoryValues) else v,
      grads, is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  norms = optim.group_norms(huge)
  assert norms["values"] > 1e3 > norms["dense"]
  state = tx.init(params)
  _, dense_a = split_by_group(step(tx, grads, state, params)[0])
  _, dense_b = split_by_group(step(tx, huge, state, params)[0])
  for a, b in zip(dense_a, dense_b):
    np.testing.assert_allclose(a, b, rtol=1e-6)  # the table's norm does not clip the rest
  assert dense_a  # the dense group is not empty


def optax_reference(cfg):
  """The optimizer as optax's chain per group, then `apply_updates`: the unfused maths."""
  multiplier = optim.lr_multiplier(cfg.train.steps, cfg.optim.warmup, cfg.optim.lr_min_ratio,
                                   cfg.optim.scheduler)

  def group(base_lr):
    return optax.chain(
        optax.clip_by_global_norm(cfg.optim.clip),
        optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
        optax.add_decayed_weights(cfg.optim.weight_decay),
        optax.scale_by_learning_rate(lambda count: base_lr * multiplier(count)),
    )

  labels = lambda params: jax.tree.map(
      lambda v: jax.tree.map(lambda _: optim.param_group(v), v), params,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return optax.multi_transform(
      {"dense": group(cfg.optim.lr), "values": group(cfg.optim.value_lr)}, labels)


def test_the_fused_update_equals_optax_chain_per_group_over_steps():
  # Warmup under way, both clips active on some steps, weight decay: one dense step of the fused
  # update against optax's chain and apply_updates, five times over, to 1e-6.
  cfg, params = setup(warmup=3, lr=1e-2, clip=0.5, weight_decay=0.1)
  tx, reference = optim.make_optimizer(cfg), optax_reference(cfg)
  ours, theirs = params, params
  s1, s2 = tx.init(params), reference.init(params)
  for i in range(5):
    grads = jax.tree.map(
        lambda p: (0.3 + i) * jnp.sin(jnp.arange(p.size, dtype=jnp.float32) + i).reshape(p.shape),
        params)
    ours, s1 = tx.apply(grads, s1, ours, optim.group_norms(grads))
    updates, s2 = reference.update(grads, s2, theirs)
    theirs = optax.apply_updates(theirs, updates)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert int(s1.count) == 5


def test_a_non_finite_step_changes_nothing():
  cfg, params = setup(warmup=0)
  tx = optim.make_optimizer(cfg)
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  new, after = tx.apply(grads, state, params, optim.group_norms(grads), finite=False)
  for a, b in zip(jax.tree.leaves((new, after)), jax.tree.leaves((params, state))):
    np.testing.assert_array_equal(a, b)


def test_cosine_schedule_ends_at_the_floor():
  m = optim.lr_multiplier(steps=110, warmup=10, min_ratio=0.1, scheduler="cosine")
  np.testing.assert_allclose([m(0), m(10), m(60), m(110)], [0, 1, 0.55, 0.1], atol=1e-6)


def test_cosine_schedule_takes_the_references_theta_and_cycle_length():
  # min_ratio + (1 - min_ratio) * (1 + cos(pi * s**theta / cycle)) / 2 at progress s after warmup
  m = optim.lr_multiplier(steps=110, warmup=10, min_ratio=0.1, scheduler="cosine",
                          cycle_length=0.5, cosine_theta=2.0)
  steps = np.array([10, 35, 60, 85, 110])
  s = (steps - 10) / 100
  expected = 0.1 + 0.45 * (1 + np.cos(np.pi * s**2 / 0.5))
  np.testing.assert_allclose([m(int(t)) for t in steps], expected, atol=1e-6)


def test_matches_optax_adamw_and_keeps_moments_in_the_state_dtype():
  cfg, params = setup(warmup=0, lr=1e-2, clip=1e9)
  grads = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape), params)
  ours = optim.make_optimizer(cfg)
  reference = optax.adamw(
      lambda step: 1e-2 * optim.lr_multiplier(cfg.train.steps, 0, cfg.optim.lr_min_ratio)(step),
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=cfg.optim.weight_decay,
  )
  p1, p2 = params, params
  s1, s2 = ours.init(params), reference.init(params)
  for _ in range(3):
    p1, s1 = ours.apply(grads, s1, p1, optim.group_norms(grads))
    u2, s2 = reference.update(grads, s2, p2)
    p2 = optax.apply_updates(p2, u2)
  _, dense1 = split_by_group(p1)
  _, dense2 = split_by_group(p2)
  for a, b in zip(dense1, dense2):  # steps of about lr = 1e-2: float32 rounding of those
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
  cfg16, _ = setup(state_dtype="bfloat16")
  tx16 = optim.make_optimizer(cfg16)
  state = tx16.init(params)
  _, state = tx16.apply(grads, state, params, optim.group_norms(grads))
  moments = jax.tree.leaves((state.mu, state.nu))
  assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
