"""memjax.sharding: the tiny memory model on 8 CPU devices, split every way the mesh allows,
computes what one device computes; the state lives where the rules say."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import config, sharding
from memjax.training import loop, state as state_lib, step as step_lib

pytestmark = pytest.mark.usefixtures("fast_compile_module")

MESHES = [(8, 1, 1), (1, 8, 1), (2, 1, 4), (1, 2, 4), (1, 1, 8)]  # (data, fsdp, memory)
MODEL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.memory.layers=[1]",
    "model.memory.n_keys=12", "model.memory.knn=4", "model.memory.heads=2",
    "model.memory.k_dim=32", "model.max_seqlen=64", "train.batch_size=8", "train.seq_len=16",
    "train.warmup=1",
]


def cfg_for(shape, *extra):
  data, fsdp, memory = shape
  return config.load("tiny", [*MODEL, f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.memory={memory}", *extra])


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


# The parameters' trajectory is compared in float64. In float32 a sharded run's reordered sums
# differ by rounding, and Adam divides each coordinate's gradient by its own RMS: where a
# coordinate's gradient is near Adam's eps (a rarely seen token's embedding, say), that rounding
# moves the update by a sizeable fraction of a step, so float32 parameters after a few steps
# differ by up to 1e-3 of their scale in a coordinate or two, on any mesh.
X64 = ["model.param_dtype=float64", "model.dtype=float64"]


@pytest.fixture(scope="module")
def single_device(fast_compile_module):
  return run_steps(cfg_for((1, 1, 1)), jax.devices()[:1], 0)[0]


@pytest.fixture(scope="module")
def single_device_x64(fast_compile_module):
  with jax.enable_x64(True):
    return run_steps(cfg_for((1, 1, 1), *X64), jax.devices()[:1], 5)[0]


def assert_close(actual, expected, what):
  """Every leaf within 1e-5 of its scale."""
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    worst = np.abs(a - b).max()
    assert worst <= 1e-5 * max(np.abs(b).max(), 1e-30), f"{what} {jax.tree_util.keystr(path)}: {worst}"


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_every_mesh_computes_what_one_device_computes(shape, single_device, single_device_x64):
  (loss, grads, _, _), state = run_steps(cfg_for(shape), jax.devices(), 0)
  want_loss, want_grads, _, _ = single_device
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert_close(grads, want_grads, "gradient")
  # Five optimizer steps follow the same trajectory: every step's loss and, after the five
  # steps, every parameter (float64; see X64).
  with jax.enable_x64(True):
    (_, _, params, losses), _ = run_steps(cfg_for(shape, *X64), jax.devices(), 5)
  _, _, want_params, want_losses = single_device_x64
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  assert_close(params, want_params, "parameter after 5 steps")
  data, fsdp, memory = shape
  table = state.params["layers"][1]["feed_forward"]["values"][...]
  assert table.addressable_shards[0].data.shape == (144, 32 // memory)


def test_table_rows_over_fsdp_divide_the_table_again():
  cfg = cfg_for((1, 2, 4), "mesh.table_rows_over_fsdp=true")
  mesh = sharding.make_mesh(cfg.mesh)
  abstract = state_lib.abstract_state(cfg, mesh)
  table = abstract.params["layers"][1]["feed_forward"]["values"].get_value()
  assert table.sharding.shard_shape(table.shape) == (72, 8)
  assert state_lib.tree_bytes_per_device(abstract.params) < state_lib.tree_bytes_per_device(
      state_lib.abstract_state(cfg_for((8, 1, 1)), sharding.make_mesh(cfg_for((8, 1, 1)).mesh)).params
  )


@pytest.mark.parametrize("mesh,message", [
    (["mesh.data=3"], "must equal the 8 devices"),
    (["mesh.fsdp=3"], "must divide the 8 devices"),
    (["mesh.memory=3"], "must divide the value dim 32"),
])
def test_bad_meshes_fail_clearly(mesh, message):
  with pytest.raises(config.ConfigError, match=message):
    sharding.make_mesh(config.load("tiny", [*MODEL, *mesh]).mesh)


def test_no_collective_moves_the_whole_table_or_its_gradient():
  cfg = cfg_for((2, 1, 4))
  mesh = sharding.make_mesh(cfg.mesh)
  with jax.set_mesh(mesh):
    train_step, abstract_args = step_lib.jit_train_step(cfg, mesh)
    hlo = train_step.lower(*abstract_args()).compile().as_text()
  ops = re.findall(
      r"= (\(.*?\)|\S+) (all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)"
      r"(?:-start)?\(",
      hlo,
  )
  assert any(kind == "all-to-all" for _, kind in ops)  # the memory-parallel lookup is there
  for shape, kind in ops:
    assert "[144,32]" not in shape, f"{kind} moves the whole (144, 32) table: {shape}"
