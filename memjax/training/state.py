"""The train state, its shardings on the mesh (`memjax.sharding`), and creating it in place."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax import optim, sharding
from memjax.config import Config, MeshConfig
from memjax.model import Transformer


class TrainState(NamedTuple):
  step: jax.Array  # int32: optimizer steps taken (skipped non-finite steps included)
  params: nnx.State  # the model's nnx.Param variables
  other: nnx.State  # the rest of the model's state (dropout RNG counters)
  opt_state: optim.AdamWState
  bad_steps: jax.Array  # int32: non-finite steps in a row
  skipped: jax.Array  # int32: non-finite steps in all
  loss_mean: jax.Array  # float32: running mean of the applied steps' losses (0 before the first)


def split_model(model: Transformer) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, other): the parameters and the rest (dropout RNG counters)."""
  return nnx.split(model, nnx.Param, ...)


def model_graphdef(cfg: Config) -> nnx.GraphDef:
  """The model's structure, from an abstract model (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed)))
  return split_model(abstract)[0]


def new_state(cfg: Config, tx: optim.AdamW, key: jax.Array) -> TrainState:
  """The initial state; `key` (that of `cfg.seed` in a run) seeds every initializer."""
  model = Transformer(cfg.model, rngs=nnx.Rngs(key))
  _, params, other = split_model(model)
  zero = jnp.zeros([], jnp.int32)
  return TrainState(zero, params, other, tx.init(params), zero, zero, jnp.zeros([], jnp.float32))


def _shapes(cfg: Config) -> TrainState:
  tx = optim.make_optimizer(cfg)
  return jax.eval_shape(lambda: new_state(cfg, tx, jax.random.key(cfg.seed)))


def state_shardings(cfg: Config, mesh: jax.sharding.Mesh, abstract: TrainState | None = None) -> TrainState:
  """A sharding for every array of the state, by the rules of `memjax.sharding`."""
  abstract = _shapes(cfg) if abstract is None else abstract
  params = sharding.param_shardings(abstract.params, mesh, cfg.mesh)
  replicated = sharding.replicated(mesh)
  return TrainState(
      step=replicated,
      params=params,
      other=jax.tree.map(lambda _: replicated, abstract.other),
      opt_state=sharding.opt_state_shardings(abstract.opt_state, params, mesh),
      bad_steps=replicated,
      skipped=replicated,
      loss_mean=replicated,
  )


def abstract_state(cfg: Config, mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Shapes, dtypes and shardings of the state, with nothing allocated (one device by default)."""
  abstract = _shapes(cfg)
  if mesh is None:
    mesh = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, state_shardings(cfg, mesh, abstract),
  )


def create_state(cfg: Config, mesh: jax.sharding.Mesh) -> TrainState:
  """The initial state, created by a jitted function straight into its shardings: no device
  ever holds more than its shards."""
  tx = optim.make_optimizer(cfg)
  # The key is an argument, not a constant: with none, XLA's GPU compiler constant-folds the
  # initializers of the whole table on the host (minutes at the 373m config's 2^20 x 1024).
  init = jax.jit(lambda key: new_state(cfg, tx, key), out_shardings=state_shardings(cfg, mesh))
  return init(jax.random.key(cfg.seed))


def tree_bytes_per_device(tree) -> int:
  """Bytes one device holds of the arrays (or sharded ShapeDtypeStructs) of `tree`."""
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += int(np.prod(shard)) * jnp.dtype(x.dtype).itemsize
  return total
