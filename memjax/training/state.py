"""The train state, the device mesh, and creating the state already placed on the mesh.

The mesh is data-parallel over every device: each batch is split over the `data` axis and the
state is replicated. (Sharding the value table and the dense parameters belongs to the sharding
layer; this module only needs one place that says where the state lives.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from memjax import optim
from memjax.config import Config
from memjax.model import Transformer


class TrainState(NamedTuple):
  step: jax.Array  # int32: optimizer steps taken (skipped non-finite steps included)
  params: nnx.State  # the model's nnx.Param variables
  other: nnx.State  # the rest of the model's state (dropout RNG counters)
  opt_state: optax.OptState
  bad_steps: jax.Array  # int32: non-finite steps in a row
  skipped: jax.Array  # int32: non-finite steps in all


def make_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh(
      (jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
  )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def split_model(model: Transformer) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, other): the parameters and the rest (dropout RNG counters)."""
  return nnx.split(model, nnx.Param, ...)


def new_state(cfg: Config, tx: optax.GradientTransformation) -> TrainState:
  model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
  _, params, other = split_model(model)
  zero = jnp.zeros([], jnp.int32)
  return TrainState(zero, params, other, tx.init(params), zero, zero)


def state_shardings(abstract: TrainState, mesh: jax.sharding.Mesh) -> Any:
  return jax.tree.map(lambda _: replicated(mesh), abstract)


def abstract_state(cfg: Config, mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Shapes, dtypes and (given a mesh) shardings of the state, with nothing allocated."""
  tx = optim.make_optimizer(cfg)
  abstract = jax.eval_shape(lambda: new_state(cfg, tx))
  if mesh is None:
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
  shardings = state_shardings(abstract, mesh)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
  )


def create_state(cfg: Config, mesh: jax.sharding.Mesh) -> TrainState:
  """The initial state, created by a jitted function straight into its shardings."""
  tx = optim.make_optimizer(cfg)
  shardings = state_shardings(jax.eval_shape(lambda: new_state(cfg, tx)), mesh)
  return jax.jit(lambda: new_state(cfg, tx), out_shardings=shardings)()


def tree_bytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
