"""Where arrays live on the device mesh: the mesh from config, the logical axes that parameters
declare where they are created, and the one table of rules that maps those to mesh axes.

Mesh axes (`mesh` config): `data` (batch split, parameters replicated), `fsdp` (batch split,
dense parameters sharded), `memory` (batch split, the value table's columns sharded: the
reference's memory parallelism, see `memjax.ops.memory_parallel`). The batch, and every
token-indexed activation, is split over all three (`BATCH`).

Each parameter names one logical axis per dim where it is created (`logical(...)`; None for a dim
that is never split), and `rules` maps those to mesh axes:

| logical axes | mesh axis |
|---|---|
| dense weights' dims: vocab, embed, heads, kv_heads, mlp, experts, query, key_heads, ... | fsdp |
| slots (the value table's rows) | fsdp when `table_rows_over_fsdp`, else none |
| slot_dim (the value table's columns) | memory |
| norm, bias (norm scales, biases: small, replicated rather than gathered at each use) | none |

A dim is split over its mesh axis when that axis has several devices, divides the dim, and no
earlier dim of the parameter took it: a dense weight is split over fsdp on its first dim that
fsdp divides.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from memjax.config import ConfigError, MeshConfig

# Mesh axes.
DATA, FSDP, MEMORY = "data", "fsdp", "memory"
AXES = (DATA, FSDP, MEMORY)
BATCH = AXES  # the batch (and every token-indexed activation) is split over all three

# Logical axes: what a parameter's dim is.
VOCAB = "vocab"  # W, the vocabulary
EMBED = "embed"  # D, the model dim
HEADS = "heads"  # attention query heads x head dim
KV_HEADS = "kv_heads"  # attention key/value heads x head dim
MLP = "mlp"  # F, an FFN's (or an expert's) hidden dim
EXPERTS = "experts"  # MoE experts; PEER's single-neuron experts
QUERY = "query"  # product-key query heads x key dim
KEY_HEADS = "key_heads"  # H, product-key heads
SUB_KEYS = "sub_keys"  # M, sub-keys per half
KEY_DIM = "key_dim"  # E, half a key
VALUE = "value"  # V, the value dim of the memory layer's projections
SLOTS = "slots"  # S, the value table's rows
SLOT_DIM = "slot_dim"  # V, the value table's columns
NORM = "norm"  # a norm's scale
BIAS = "bias"  # a bias
LOGICAL_AXES = "logical_axes"  # the variable metadata key that holds them


def rules(cfg: MeshConfig) -> dict[str, str | None]:
  """Logical axis -> mesh axis (None: replicated)."""
  dense = (VOCAB, EMBED, HEADS, KV_HEADS, MLP, EXPERTS, QUERY, KEY_HEADS, SUB_KEYS, KEY_DIM, VALUE)
  return {axis: FSDP for axis in dense} | {
      SLOTS: FSDP if cfg.table_rows_over_fsdp else None,
      SLOT_DIM: MEMORY,
      NORM: None,
      BIAS: None,
  }


def logical(*axes: str | None) -> dict[str, Any]:
  """Variable metadata naming a parameter's logical axes, one per dim: `nnx.Param(value,
  **logical(EMBED, MLP))`, or an nnx.Linear's `kernel_metadata=logical(EMBED, MLP)`.

  Its own key, not Flax's `out_sharding`: Flax reads that as mesh axes when a variable is created
  or `nnx.eval_shape`d under a mesh, where these names need `rules` (which depend on the mesh
  config and on what divides what) to become mesh axes. `param_shardings` places the whole state.
  """
  return {LOGICAL_AXES: axes}


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
  """The (data, fsdp, memory) mesh over `devices` (default: all), laid onto a TPU slice's torus
  by jax's mesh_utils. A size that is no product of whole torus axes (8 on a 4x4x4 v5p-128) is
  placed by splitting a physical axis, with a warning: see `split_torus_axes`."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(cfg, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * 3
  try:
    return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
  except NotImplementedError:  # mesh_utils found no whole torus axes for some size
    pass
  mappable = torus_shapes(devices)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (NotImplementedError, ValueError) as error:
    raise ConfigError(
        "mesh", f"data x fsdp x memory = {shape} does not map onto the devices ({error}); shapes "
        f"that do: {', '.join('x'.join(map(str, s)) for s in mappable)}"
    ) from None
  warnings.warn(
      f"mesh data x fsdp x memory = {'x'.join(map(str, shape))} split a physical axis of the "
      f"TPU torus ({SPLIT_COST}); shapes on whole axes: "
      f"{', '.join('x'.join(map(str, s)) for s in mappable)}",
      stacklevel=2,
  )
  return Mesh(grid, AXES, axis_types=axis_types)


SPLIT_COST = (
    "collectives over a mesh axis that holds part of a torus axis run on sub-rings that share "
    "that axis's links, and lose its wrap-around link: up to about half the bandwidth of a "
    "whole axis"
)


def torus_shapes(devices) -> list[tuple[int, int, int]]:
  """The (data, fsdp, memory) shapes over all of `devices` that mesh_utils lays onto whole
  torus axes, without splitting one."""
  n = len(devices)
  shapes = [(d, f, n // (d * f)) for d in range(1, n + 1) for f in range(1, n // d + 1)
            if n % (d * f) == 0]
  found = []
  for shape in shapes:
    try:
      mesh_utils.create_device_mesh(shape, devices)
    except (NotImplementedError, ValueError):
      continue
    found.append(shape)
  return found


def split_torus_axes(mesh: Mesh) -> list[str]:
  """Mesh axes that share a physical torus axis (device coords, and the core on its chip) with
  another mesh axis: empty when each mesh axis holds whole torus axes."""
  first = mesh.devices.flat[0]
  if first.platform != "tpu" or not hasattr(first, "coords"):
    return []
  coords = np.array([[*d.coords, getattr(d, "core_on_chip", 0)] for d in mesh.devices.flat])
  coords = coords.reshape(*mesh.devices.shape, -1)
  owners: dict[int, set[str]] = {}
  for i, name in enumerate(mesh.axis_names):
    line = np.moveaxis(coords, i, 0)[(slice(None),) + (0,) * (coords.ndim - 2)]
    for physical in np.flatnonzero((line != line[0]).any(axis=0)):
      owners.setdefault(int(physical), set()).add(name)
  return sorted({name for names in owners.values() if len(names) > 1 for name in names})


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def token_mesh(n_tokens: int) -> jax.sharding.AbstractMesh | None:
  """The current mesh when it has several devices, the `BATCH` axes, and `n_tokens` split evenly
  over them: where a layer runs its kernels per device on its own tokens (`P(BATCH)`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or not set(BATCH) <= set(mesh.axis_names):
    return None
  if n_tokens % math.prod(mesh.shape[axis] for axis in BATCH):
    return None
  return mesh


def param_spec(variable: nnx.Variable, shape: tuple[int, ...], mesh: Mesh, cfg: MeshConfig) -> P:
  """The variable's logical axes (see `logical`) placed by `rules(cfg)` on `mesh`."""
  names = variable.get_metadata(LOGICAL_AXES, None)
  if names is None or len(names) != len(shape):
    raise ValueError(
        f"a {type(variable).__name__} of shape {shape} must name one logical axis per dim "
        f"(memjax.sharding.logical), got {names}"
    )
  table = rules(cfg)
  spec, used = [], set()
  for name, size in zip(names, shape):
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
    axis = None if name is None else table[name]
    if axis is None or axis in used or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def param_shardings(params: nnx.State, mesh: Mesh, cfg: MeshConfig) -> Any:
  """A sharding for every parameter array (the tree of `params`, Variables kept)."""

  def place(path, v):
    try:
      return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(v, x.shape, mesh, cfg)), v)
    except ValueError as e:
      raise ValueError(f"{jax.tree_util.keystr(path)}: {e}") from None

  return jax.tree_util.tree_map_with_path(
      place, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
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
