"""Train steps of small models on one device or split over a mesh of the 8 CPU devices, and
comparing their results."""

import jax
import jax.numpy as jnp
import numpy as np

from memjax import config, config_loading, sharding
from memjax.training import state as state_lib, step as step_lib

MESHES = [(8, 1, 1), (1, 8, 1), (2, 1, 4), (1, 2, 4), (1, 1, 8)]  # (data, fsdp, memory)
# A tiny memory model: a (144, 32) table read by block 1.
MODEL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.memory.layers=[1]",
    "model.memory.n_keys=12", "model.memory.knn=4", "model.memory.heads=2",
    "model.memory.k_dim=32", "model.max_seqlen=64", "train.batch_size=8", "train.seq_len=16",
    "optim.warmup=1",
]

# The parameters' trajectory is compared in float64. In float32 a sharded run's reordered sums
# differ by rounding, and Adam divides each coordinate's gradient by its own RMS: where a
# coordinate's gradient is near Adam's eps (a rarely seen token's embedding, say), that rounding
# moves the update by a sizeable fraction of a step, so float32 parameters after a few steps
# differ by up to 1e-3 of their scale in a coordinate or two, on any mesh.
X64 = ["model.param_dtype=float64", "model.dtype=float64"]


def cfg_for(shape, *extra, base="tiny", model=MODEL):
  """`configs/<base>` with `model`'s overrides on the (data, fsdp, memory) mesh `shape`."""
  data, fsdp, memory = shape
  return config_loading.load(
      base, [*model, f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.memory={memory}", *extra]
  )


def tokens(step):
  return jnp.asarray(np.random.default_rng(step).integers(0, 258, (8, 17)), jnp.int32)


def run_steps(cfg, devices, n_steps, rows=None):
  """Loss and gradients at the initial state, and the parameters after n_steps (`rows`: the
  tables' gradient form, see `step.make_train_step`)."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  with jax.set_mesh(mesh):
    state = state_lib.create_state(cfg, mesh)
    graphdef = state_lib.model_graphdef(cfg)
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p, o, t: step_lib._loss(graphdef, p, o, t)[0]
    ))
    place = lambda t: jax.device_put(t, sharding.batch_sharding(mesh))
    loss, grads = grad_fn(state.params, state.other, place(tokens(0)))
    train_step, _ = step_lib.jit_train_step(cfg, mesh, rows)
    losses = []
    for step in range(n_steps):
      state, metrics = train_step(state, place(tokens(step)))
      losses.append(metrics["loss"])
    return jax.device_get((loss, grads, state.params, losses)), state


def train_steps(cfg: config.Config, steps: int):
  """`steps` jitted train steps of `cfg` on one device and random tokens: the losses and the
  last metrics."""
  mesh = sharding.make_mesh(config.MeshConfig(data=1), jax.devices()[:1])
  rng = np.random.default_rng(0)
  tokens_BT1 = rng.integers(0, 64, (cfg.train.batch_size, cfg.train.seq_len + 1))
  with jax.set_mesh(mesh):
    jitted, _ = step_lib.jit_train_step(cfg, mesh)
    state = state_lib.create_state(cfg, mesh)
    batch = jax.device_put(jnp.asarray(tokens_BT1, jnp.int32), sharding.batch_sharding(mesh))
    losses = []
    for _ in range(steps):
      state, metrics = jitted(state, batch)
      losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(metrics)


def assert_close(actual, expected, what):
  """Every leaf within 1e-5 of its scale."""
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    worst = np.abs(a - b).max()
    assert worst <= 1e-5 * max(np.abs(b).max(), 1e-30), f"{what} {jax.tree_util.keystr(path)}: {worst}"
