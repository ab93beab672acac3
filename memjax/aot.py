"""Compiles the train step for a Cloud TPU topology on any machine, and reports what it needs.

  python -m memjax.aot config=configs/pkplus_373m_1024k.yaml topology=v5p-8 [mesh.memory=4 ...]

Needs libtpu (`pip install -e '.[tpu]'`); no TPU. The compile is the real one (XLA's TPU
compiler, through jax's ahead-of-time path), so it enforces what only hardware would otherwise
tell: per-device HBM of parameters, optimizer state and temporaries, against the chip's. Also
prints the compiled FLOPs and bytes accessed per step. The lookup compiles with the impl a TPU
run would pick (`auto`: the table's TPU impl, the Pallas kernels) unless the config names another.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this machine's backend; the target is the topology
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# Compiling opens no TPU, so several compiles (or a compile beside a training run) may share libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

from memjax import config as config_lib  # noqa: E402
from memjax import config_loading  # noqa: E402
from memjax import ops, sharding  # noqa: E402
from memjax.training import state as state_lib, step as step_lib  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # in libtpu's topology strings, e.g. "v5p"
  hbm_gib: float  # per chip
  cores_per_chip_in_name: int  # Cloud TPU names count TensorCores (v4, v5p) or chips
  dims: int  # 3-D (v4, v5p) or 2-D torus


GENERATIONS = {
    "v4": Generation("v4", 32, 2, 3),
    "v5p": Generation("v5p", 95, 2, 3),
    "v5e": Generation("v5e", 16, 1, 2),
    "v5litepod": Generation("v5e", 16, 1, 2),
    "v6e": Generation("v6e", 32, 1, 2),
}


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
  """The slice shape Cloud TPU uses for a chip count: as square (cubic) as powers of two allow."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"a TPU slice has a power-of-two number of chips, got {chips}")
  grid = [1] * dims
  while chips > 1:  # double the smallest axis first: 8 chips are 2x4 (2-D) or 2x2x2 (3-D)
    grid[grid.index(min(grid))] *= 2
    chips //= 2
  used = sorted(g for g in grid if g > 1)
  return tuple(used + [1] * (dims - len(used)))  # 4 chips in 3-D: 2x2x1


def parse_topology(name: str) -> tuple[str, Generation, int]:
  """"v5p-8" -> ("v5p:2x2x1", v5p, 4 chips)."""
  match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
  if match is None:
    raise config_lib.ConfigError(
        "topology", f"must be a Cloud TPU name such as v5p-8, v5e-8, v6e-16; got {name!r}"
    )
  generation = GENERATIONS[match.group(1)]
  count = int(match.group(2))
  if count % generation.cores_per_chip_in_name:
    raise config_lib.ConfigError("topology", f"{name}: {count} is not a whole number of chips")
  chips = count // generation.cores_per_chip_in_name
  try:
    grid = chip_grid(chips, generation.dims)
  except ValueError as error:
    raise config_lib.ConfigError("topology", f"{name}: {error}") from None
  return f"{generation.name}:{'x'.join(map(str, grid))}", generation, chips


def _gib(n: float) -> str:
  return f"{n / 2**30:,.2f} GiB"


def _tpu_impls(cfg: config_lib.Config) -> config_lib.Config:
  """`cfg` with "auto" lookup impls as a TPU run resolves them, not as this machine would."""
  model = cfg.model
  for section in ("memory", "peer"):
    layer = getattr(model, section)
    if layer.impl == "auto":
      model = dataclasses.replace(
          model, **{section: dataclasses.replace(layer, impl=ops.auto_impl("tpu"))})
  return dataclasses.replace(cfg, model=model)


def compile_for(cfg: config_lib.Config, topology: str) -> dict:
  """Compiles cfg's train step for `topology`; returns the per-device figures."""
  from jax.experimental import topologies

  libtpu_name, generation, chips = parse_topology(topology)
  cfg = _tpu_impls(cfg)
  topo = topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name)
  devices = topo.devices
  mesh = sharding.make_mesh(cfg.mesh, devices)
  train = cfg.train
  if train.batch_size % len(devices):
    raise config_lib.ConfigError(
        "train.batch_size", f"must be a multiple of the {len(devices)} devices, got {train.batch_size}"
    )
  with jax.set_mesh(mesh):
    train_step, abstract_args = step_lib.jit_train_step(cfg, mesh)
    abstract, batch = abstract_args()
    start = time.perf_counter()
    compiled = train_step.lower(abstract, batch).compile()
    seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, list) else cost
  figures = {
      "topology": topology,
      "libtpu_topology": libtpu_name,
      "devices": len(devices),
      "device_kind": devices[0].device_kind,
      "mesh": dict(mesh.shape),
      "impl": cfg.model.memory.impl,
      "table_update": cfg.optim.table_update,
      "table_grad": "rows" if step_lib.row_gradients(cfg) else "dense",
      "compile_s": seconds,
      "params_bytes": state_lib.tree_bytes_per_device(abstract.params),
      "opt_state_bytes": state_lib.tree_bytes_per_device(abstract.opt_state),
      "arguments_bytes": memory.argument_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      "hbm_bytes": generation.hbm_gib * 2**30,
      "flops": cost.get("flops", float("nan")),
      "bytes_accessed": cost.get("bytes accessed", float("nan")),
  }
  figures["total_bytes"] = figures["arguments_bytes"] + figures["temp_bytes"]
  figures["fits"] = figures["total_bytes"] <= figures["hbm_bytes"]
  return figures


def report(f: dict) -> str:
  return "\n".join([
      f"{f['topology']} ({f['libtpu_topology']}, {f['devices']} x {f['device_kind']}), mesh "
      f"{f['mesh']}, lookup impl {f['impl']}, {f['table_update']} table update (gradient as "
      f"{'touched rows' if f['table_grad'] == 'rows' else 'an (S, V) array'}); compiled in "
      f"{f['compile_s']:.0f}s",
      f"per device: parameters {_gib(f['params_bytes'])}, optimizer state "
      f"{_gib(f['opt_state_bytes'])}, temporaries {_gib(f['temp_bytes'])}; total "
      f"{_gib(f['total_bytes'])} of {_gib(f['hbm_bytes'])} HBM: "
      + ("fits" if f["fits"] else "DOES NOT FIT"),
      f"per step per device: {f['flops']:.3g} FLOPs, {f['bytes_accessed']:.3g} bytes accessed",
  ])


def main(argv: list[str]) -> int:
  if "-h" in argv or "--help" in argv:
    print(__doc__)
    return 0
  path, options, overrides = config_loading.split_command_line(argv, ("topology",))
  topology = options.get("topology")
  try:
    if topology is None:
      raise config_lib.ConfigError("topology", "give topology=<Cloud TPU name>, e.g. v5p-8")
    cfg = config_loading.load(path, overrides)
    print(report(compile_for(cfg, topology)))
  except (config_lib.ConfigError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
