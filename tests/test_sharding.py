"""memjax.sharding: the tiny memory model on 8 CPU devices, split every way the mesh allows,
computes what one device computes; the state lives where the rules say."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from memjax import config, config_loading, sharding
from memjax.model import Transformer
from memjax.training import state as state_lib, step as step_lib

from support.meshes import MESHES, MODEL, X64, assert_close, cfg_for, run_steps

pytestmark = pytest.mark.usefixtures("fast_compile_module")


@pytest.fixture(scope="module")
def single_device(fast_compile_module):
  return run_steps(cfg_for((1, 1, 1)), jax.devices()[:1], 0)[0]


@pytest.fixture(scope="module")
def single_device_x64(fast_compile_module):
  with jax.enable_x64(True):
    return run_steps(cfg_for((1, 1, 1), *X64), jax.devices()[:1], 5)[0]


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
    sharding.make_mesh(config_loading.load("tiny", [*MODEL, *mesh]).mesh)


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


# A tiny PEER model: 8^2 experts per table, read by block 1.
PEER_MODEL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.peer.layers=[1]",
    "model.peer.n_keys=8", "model.peer.knn=4", "model.peer.heads=2", "model.peer.k_dim=16",
    "model.max_seqlen=64", "train.batch_size=8", "train.seq_len=16", "optim.warmup=1",
]


def test_a_peer_model_split_every_way_computes_what_one_device_computes():
  # Its selection runs per device, its tables are split over fsdp and its down projection's
  # columns over memory, as the memory layer's are.
  peer_cfg = lambda shape: cfg_for(shape, base="tiny_peer", model=PEER_MODEL)
  (want_loss, want_grads, _, _), _ = run_steps(peer_cfg((1, 1, 1)), jax.devices()[:1], 0)
  (loss, grads, _, _), _ = run_steps(peer_cfg((2, 2, 2)), jax.devices(), 0)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert_close(grads, want_grads, "gradient")


@pytest.mark.parametrize("name", ["tiny", "tiny_moe", "tiny_peer"])
def test_every_parameter_names_a_logical_axis_with_a_rule_for_each_dim(name):
  cfg = config_loading.load(name, ["model.memory.gated=true"] if name == "tiny" else [])
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  rules = sharding.rules(cfg.mesh)
  for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = param.get_metadata(sharding.LOGICAL_AXES, None)
    assert axes is not None and len(axes) == param.get_value().ndim, (path, axes)
    assert all(axis is None or axis in rules for axis in axes), (path, axes)


def test_the_rules_split_dense_weights_over_fsdp_and_the_table_over_memory():
  mesh = sharding.make_mesh(config.MeshConfig(data=1, fsdp=4, memory=2))
  spec = lambda shape, *axes, rows_over_fsdp=False: sharding.param_spec(
      nnx.Param(jax.ShapeDtypeStruct(shape, jnp.float32), **sharding.logical(*axes)), shape, mesh,
      config.MeshConfig(data=1, fsdp=4, memory=2, table_rows_over_fsdp=rows_over_fsdp),
  )
  # A dense weight on its first dim that fsdp divides, and on one dim only.
  assert spec((258, 32), sharding.VOCAB, sharding.EMBED) == P(None, sharding.FSDP)
  assert spec((32, 64), sharding.EMBED, sharding.MLP) == P(sharding.FSDP)
  assert spec((2, 2, 6, 8), sharding.KEY_HEADS, None, sharding.SUB_KEYS, sharding.KEY_DIM) == (
      P(None, None, None, sharding.FSDP))
  assert spec((32,), sharding.NORM) == spec((64,), sharding.BIAS) == P()
  assert spec((144, 32), sharding.SLOTS, sharding.SLOT_DIM) == P(None, sharding.MEMORY)
  assert spec((144, 32), sharding.SLOTS, sharding.SLOT_DIM, rows_over_fsdp=True) == (
      P(sharding.FSDP, sharding.MEMORY))


def test_a_parameter_without_logical_axes_is_named_in_the_error():
  linear = nnx.eval_shape(lambda: nnx.Linear(4, 8, use_bias=False, rngs=nnx.Rngs(0)))
  params = nnx.state(linear, nnx.Param)
  mesh = sharding.make_mesh(config.MeshConfig())
  with pytest.raises(ValueError, match=r"\['kernel'\].*one logical axis per dim"):
    sharding.param_shardings(params, mesh, config.MeshConfig())


def test_the_placement_rules_do_not_import_the_layers():
  code = (
      "import sys, memjax.sharding; "
      "sys.exit(any(m.startswith('memjax.layers') for m in sys.modules))"
  )
  env = os.environ | {"JAX_PLATFORMS": "cpu"}
  assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
