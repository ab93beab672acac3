"""Where arrays live on the device mesh: the mesh from config, and the rules that place the
parameters, the optimizer state and the batch.

Mesh axes (`mesh` config): `data` (batch split, parameters replicated), `fsdp` (batch split,
dense parameters sharded), `memory` (batch split, the value table's columns sharded: the
reference's memory parallelism, see `memjax.ops.memory_parallel`). The batch is split over all
three. The rules, by logical role:

| role | mesh axes |
|---|---|
| batch | (data, fsdp, memory) |
| value table rows | fsdp when `table_rows_over_fsdp`, else none |
| value table columns | memory |
| dense weights (2-D and up) | fsdp on the first dim it divides (input dims first), else none |
| vectors (norms, biases) and scalars | none |
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from memjax.config import ConfigError, MeshConfig
from memjax.layers.memory import MemoryValues

AXES = ("data", "fsdp", "memory")
BATCH = AXES  # the batch (and every token-indexed activation) is split over all three


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
  """The three axis sizes, -1 filled; errors name the field and the device count."""
  sizes = [cfg.data, cfg.fsdp, cfg.memory]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % fixed:
      raise ConfigError(
          "mesh", f"the fixed axes ({fixed} devices) must divide the {n_devices} devices, got {cfg}"
      )
    sizes[sizes.index(-1)] = n_devices // fixed
  if math.prod(sizes) != n_devices:
    raise ConfigError(
        "mesh",
        f"data x fsdp x memory = {math.prod(sizes)} must equal the {n_devices} devices, got {cfg}",
    )
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(
      shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(variable: nnx.Variable, shape: tuple[int, ...], mesh: Mesh, cfg: MeshConfig) -> P:
  if isinstance(variable, MemoryValues):
    rows = "fsdp" if cfg.table_rows_over_fsdp and shape[0] % mesh.shape["fsdp"] == 0 else None
    return P(rows, "memory")
  fsdp = mesh.shape["fsdp"]
  if len(shape) < 2 or fsdp == 1:
    return P()
  for dim, size in enumerate(shape):
    if size % fsdp == 0:
      return P(*([None] * dim), "fsdp")
  return P()


def param_shardings(params: nnx.State, mesh: Mesh, cfg: MeshConfig) -> Any:
  """A sharding for every parameter array (the tree of `params`, Variables kept)."""
  return jax.tree.map(
      lambda v: jax.tree.map(
          lambda x: NamedSharding(mesh, param_spec(v, x.shape, mesh, cfg)), v
      ),
      params,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def opt_state_shardings(opt_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
  """Moments follow their parameters (matched by path: an optimizer state's moment trees end
  in the parameters' own paths); counts and other leaves are replicated."""
  by_path = {
      tuple(map(str, path)): s
      for path, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]
  }

  def place(path, _):
    keys = tuple(map(str, path))
    for start in range(len(keys)):
      found = by_path.get(keys[start:])
      if found is not None:
        return found
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(place, opt_state)

