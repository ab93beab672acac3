"""Compiles the train step for a Cloud TPU topology on any machine, and says whether it fits.

  python -m memjax.aot config=configs/pkplus_373m_1024k.yaml topology=v5p-8 [mesh.memory=4 ...]
  python -m memjax.aot config=... topology=v5e-8 --search     # compile every mesh, print the best

Needs libtpu (`pip install -e '.[tpu]'`); no TPU. The compile is the real one (XLA's TPU
compiler, through jax's ahead-of-time path), so it enforces what only hardware would otherwise
tell: per-chip HBM of parameters, optimizer state and temporaries, against what the compiler
allows of the chip's HBM. The lookup compiles with the impl a TPU run would pick (`auto`: the
table's TPU impl, the Pallas kernels) unless the config names another.

When it fits: the per-chip memory, and a roofline estimate of the step from the compiled FLOPs
and bytes accessed against the chip's bf16 peak (`memjax.hardware`) and HBM bandwidth
(`GENERATIONS`), with the slice's tokens/s. Exit 0.
When it does not: "does not fit: needs X of Y GiB per chip", the biggest consumers and the
changes that shrink them, each with its exact parameter and optimizer-state bytes. Exit 1.
`--search` compiles every mesh (data x fsdp x memory, and the table's rows over fsdp) the config
allows on the slice, keeping the mesh fields given on the command line, and prints the best that
fits: the one with the shortest roofline step,
ties going to the least memory per chip. A mesh that does not lie on whole axes of the slice's
torus is placed by splitting an axis (`memjax.sharding.make_mesh`); the report says so.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
import warnings

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this machine's backend; the target is the topology
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# Compiling opens no TPU, so several compiles (or a compile beside a training run) may share libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from memjax import platforms  # noqa: E402

platforms.quiet_libtpu()

import jax  # noqa: E402

from memjax import cli  # noqa: E402
from memjax import config as config_lib  # noqa: E402
from memjax import config_loading  # noqa: E402
from memjax import hardware, ops, sharding  # noqa: E402
from memjax.training import state as state_lib, step as step_lib  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # in libtpu's topology strings, e.g. "v5p"
  hbm_gib: float  # per chip
  hbm_bandwidth: float  # bytes/s per chip
  cores_per_chip_in_name: int  # Cloud TPU names count TensorCores (v4, v5p) or chips
  dims: int  # 3-D (v4, v5p) or 2-D torus
  source: str  # where the bandwidth is published (the bf16 peaks: `memjax.hardware`)


# Google's Cloud TPU system-architecture pages (read 2026-12): "HBM bandwidth per chip" (GB/s of
# 1e9 bytes) and the HBM capacity in GiB. v5p's page says 95 GB, but its compiler allows 95.74
# GiB of it (`allowed_hbm`), so the chip carries 96 GiB.
GENERATIONS = {
    "v4": Generation("v4", 32, 1200e9, 2, 3, "cloud.google.com/tpu/docs/v4"),
    "v5p": Generation("v5p", 96, 2765e9, 2, 3, "cloud.google.com/tpu/docs/v5p"),
    "v5e": Generation("v5e", 16, 819e9, 1, 2, "cloud.google.com/tpu/docs/v5e"),
    "v6e": Generation("v6e", 32, 1640e9, 1, 2, "cloud.google.com/tpu/docs/v6e"),
}
GENERATIONS["v5litepod"] = GENERATIONS["v5e"]

EXIT_DOES_NOT_FIT = 1


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
  return f"{n / 2**30:,.2f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:,.1f} MiB"


def _tpu_impls(cfg: config_lib.Config) -> config_lib.Config:
  """`cfg` with "auto" lookup impls as a TPU run resolves them, not as this machine would."""
  model = cfg.model
  for section in ("memory", "peer"):
    layer = getattr(model, section)
    if layer.impl == "auto":
      model = dataclasses.replace(
          model, **{section: dataclasses.replace(layer, impl=ops.auto_impl("tpu"))})
  return dataclasses.replace(cfg, model=model)


def with_overrides(cfg: config_lib.Config, changes: dict[str, object]) -> config_lib.Config:
  """`cfg` with {"section.field": value} replaced (and validated again)."""
  sections: dict[str, dict[str, object]] = {}
  for key, value in changes.items():
    section, field = key.split(".")
    sections.setdefault(section, {})[field] = value
  return dataclasses.replace(cfg, **{
      section: dataclasses.replace(getattr(cfg, section), **fields)
      for section, fields in sections.items()
  })


# ----------------------------------------------------------------------------------------------
# What the compiler allows, and what it says when a program does not fit.

_SIZE = r"([\d.]+)([KMGT]?)"  # XLA prints sizes in powers of 1024: 15.75G is 15.75 GiB


def _bytes(number: str, unit: str) -> float:
  return float(number) * 1024 ** " KMGT".index(unit or " ")


def parse_out_of_memory(message: str) -> dict[str, float] | None:
  """{"needed": bytes, "allowed": bytes} from XLA's TPU out-of-memory message; None when the
  message is not one. Two forms: "... HLO temporaries (33.71G) exceeds available HBM (15.75G)"
  and "Used 20.5G of 15.75G hbm"."""
  if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
    return None
  temps = re.search(rf"temporaries \({_SIZE}\)", message)
  allowed = re.search(rf"available HBM \({_SIZE}\)", message)
  if temps and allowed:
    return {"temporaries": _bytes(*temps.groups()), "allowed": _bytes(*allowed.groups())}
  used = re.search(rf"[Uu]sed {_SIZE} of {_SIZE} hbm", message)
  if used:
    return {"used": _bytes(*used.groups()[:2]), "allowed": _bytes(*used.groups()[2:])}
  return {}


_ALLOWED: dict[str, float] = {}


def allowed_hbm(device) -> float | None:
  """The HBM bytes the compiler lets one program use on `device`'s chip (less than the chip's:
  the runtime keeps some), read from its out-of-memory message for a probe that asks for 4 TiB."""
  if device.device_kind not in _ALLOWED:
    one = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((8, 128), "float32", sharding=one)

    def probe(x):  # the barrier keeps the broadcast a real (2^30, 8, 128) temporary
      return jax.lax.optimization_barrier(jax.numpy.broadcast_to(x, (2**30, 8, 128)))[::2**20].sum()

    try:
      jax.jit(probe).lower(x).compile()
      found = None
    except jax.errors.JaxRuntimeError as error:
      found = (parse_out_of_memory(str(error)) or {}).get("allowed")
    _ALLOWED[device.device_kind] = found
  return _ALLOWED[device.device_kind]


# ----------------------------------------------------------------------------------------------
# One compile.


def fit_micro_batch(cfg: config_lib.Config, devices: int) -> tuple[config_lib.Config, str]:
  """`cfg` with train.grad_accum lowered until each micro-batch is a multiple of the devices (as
  train.py requires), and a note saying so; unchanged with "" when it is already."""
  train = cfg.train
  accum = train.grad_accum
  while accum > 1 and train.batch_size % (accum * devices):
    accum -= 1
  if accum == train.grad_accum or train.batch_size % (accum * devices):
    return cfg, ""
  note = (f"train.grad_accum={train.grad_accum} leaves {train.batch_size // train.grad_accum} "
          f"sequences per micro-batch for {devices} devices (train.py needs a multiple): compiled "
          f"with train.grad_accum={accum}, as a run on this slice must set")
  return with_overrides(cfg, {"train.grad_accum": accum}), note


def state_bytes(cfg: config_lib.Config, mesh, shapes=None) -> tuple[int, int, int]:
  """Per device: parameters, optimizer state, and the batch, as `cfg` places them on `mesh`.
  `shapes` (`state_lib.abstract_state(cfg)`) saves tracing the model again: meshes do not change
  them."""
  shapes = state_lib.abstract_state(cfg) if shapes is None else shapes
  placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, state_lib.state_shardings(cfg, mesh, shapes))
  sequences = cfg.train.batch_size // math.prod(mesh.shape.values())  # all its micro-batches
  return (state_lib.tree_bytes_per_device(placed.params),
          state_lib.tree_bytes_per_device(placed.opt_state),
          sequences * (cfg.train.seq_len + 1) * 4)


def compile_for(cfg: config_lib.Config, topology: str) -> dict:
  """Compiles cfg's train step for `topology`; returns the per-device figures, also when the
  step does not fit (then "fits" is False and the temporaries are the compiler's message's)."""
  from jax.experimental import topologies

  libtpu_name, generation, chips = parse_topology(topology)
  cfg = _tpu_impls(cfg)
  topo = topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name)
  devices = topo.devices
  train = cfg.train
  if train.batch_size % len(devices):
    raise config_lib.ConfigError(
        "train.batch_size",
        f"must be a multiple of the {len(devices)} devices, got {train.batch_size}",
    )
  cfg, accum_note = fit_micro_batch(cfg, len(devices))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a split torus axis is reported below
    mesh = sharding.make_mesh(cfg.mesh, devices)
  split = sharding.split_torus_axes(mesh)
  params, opt_state, batch = state_bytes(cfg, mesh)
  per_chip = len(devices) // chips
  allowed = allowed_hbm(devices[0])
  figures = {
      "config": cfg,
      "topology": topology,
      "libtpu_topology": libtpu_name,
      "generation": generation,
      "devices": len(devices),
      "devices_per_chip": per_chip,
      "device_kind": devices[0].device_kind,
      "mesh": dict(mesh.shape),
      "split_axes": split,
      "torus_shapes": sharding.torus_shapes(devices) if split else [],
      "notes": [accum_note] if accum_note else [],
      "impl": cfg.model.memory.impl,
      "table_update": cfg.optim.table_update,
      "table_grad": "rows" if step_lib.row_gradients(cfg) else "dense",
      "params_bytes": params,
      "opt_state_bytes": opt_state,
      "batch_bytes": batch,
      "hbm_bytes": generation.hbm_gib * 2**30 / per_chip,
      "allowed_bytes": allowed,
      "allowed_from": "compiler",
      "tokens_per_step": train.batch_size * train.seq_len,
      "grad_accum": cfg.train.grad_accum,
  }
  if allowed is None:  # no probe answer: the chip's whole HBM
    figures["allowed_bytes"], figures["allowed_from"] = figures["hbm_bytes"], "published"
  with jax.set_mesh(mesh):
    train_step, abstract_args = step_lib.jit_train_step(cfg, mesh)
    lowered = train_step.lower(*abstract_args())
    start = time.perf_counter()
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
      oom = parse_out_of_memory(str(error))
      if oom is None:
        raise
      compiled = None
    figures["compile_s"] = time.perf_counter() - start
  arguments = params + opt_state + batch
  if compiled is None:
    figures["allowed_bytes"] = oom.get("allowed", figures["allowed_bytes"])
    figures["temp_bytes"] = oom.get("temporaries", oom.get("used", arguments) - arguments)
    figures["total_bytes"] = arguments + figures["temp_bytes"]
    figures["fits"] = False
    return figures
  memory = compiled.memory_analysis()
  cost = hardware.cost_analysis(compiled)
  figures.update(
      arguments_bytes=memory.argument_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes,
      total_bytes=memory.argument_size_in_bytes + memory.temp_size_in_bytes,
      flops=cost.get("flops", float("nan")),
      bytes_accessed=cost.get("bytes accessed", float("nan")),
  )
  figures["fits"] = figures["total_bytes"] <= figures["allowed_bytes"]
  figures.update(roofline(figures))
  return figures


def roofline(f: dict) -> dict:
  """The step's time at the chip's peaks: the larger of the compiled per-device FLOPs over the
  peak FLOP/s and the bytes accessed over the HBM bandwidth. XLA's cost analysis counts a loop's
  body once: the micro-batch loop's figures are scaled by train.grad_accum (which counts the
  once-a-step optimizer update that many times too: an overstatement, small when the
  micro-batches dominate)."""
  g, per_chip, accum = f["generation"], f["devices_per_chip"], f["grad_accum"]
  compute_s = f["flops"] * accum / (hardware.peak(f["device_kind"]).flops / per_chip)
  memory_s = f["bytes_accessed"] * accum / (g.hbm_bandwidth / per_chip)
  step_s = max(compute_s, memory_s)
  return {"compute_s": compute_s, "memory_s": memory_s, "step_s": step_s,
          "tokens_per_s": f["tokens_per_step"] / step_s if step_s > 0 else float("nan")}


# ----------------------------------------------------------------------------------------------
# Reports.


def _header(f: dict) -> str:
  mesh = " x ".join(f"{k} {v}" for k, v in f["mesh"].items())
  return (
      f"{f['topology']} ({f['libtpu_topology']}, {f['devices']} x {f['device_kind']}), mesh "
      f"{mesh}{' (table rows over fsdp)' if f['config'].mesh.table_rows_over_fsdp else ''}, "
      f"lookup impl {f['impl']}, {f['table_update']} table update (gradient as "
      f"{'touched rows' if f['table_grad'] == 'rows' else 'an (S, V) array'}); compiled in "
      f"{f['compile_s']:.0f}s"
  )


def _unit(f: dict) -> str:
  return "chip" if f["devices_per_chip"] == 1 else "device (TensorCore)"


def _allowed(f: dict) -> str:
  source = ("the compiler allows" if f["allowed_from"] == "compiler"
            else "HBM (the compiler's limit unknown)")
  return f"{_gib(f['allowed_bytes'])} {source} of the {_gib(f['hbm_bytes'])} HBM"


def _placement(f: dict) -> list[str]:
  if not f["split_axes"]:
    return []
  shapes = ", ".join("x".join(map(str, s)) for s in f["torus_shapes"])
  return [f"placement: mesh axes {', '.join(f['split_axes'])} split physical axes of the "
          f"{f['libtpu_topology']} torus ({sharding.SPLIT_COST}). Shapes (data x fsdp x "
          f"memory) on whole axes: {shapes}"]


def report(f: dict) -> str:
  if not f["fits"]:
    return does_not_fit_report(f)
  g, peak = f["generation"], hardware.peak(f["device_kind"])
  accum = f"x {f['grad_accum']} micro-batches, " if f["grad_accum"] > 1 else ""
  return "\n".join([
      _header(f),
      *(f"note: {n}" for n in f["notes"]),
      *_placement(f),
      f"per {_unit(f)}: parameters {_gib(f['params_bytes'])}, optimizer state "
      f"{_gib(f['opt_state_bytes'])}, temporaries {_gib(f['temp_bytes'])}; total "
      f"{_gib(f['total_bytes'])} of {_allowed(f)}: fits, "
      f"{_gib(f['allowed_bytes'] - f['total_bytes'])} to spare",
      f"per step per {_unit(f)}: {f['flops'] * f['grad_accum']:.3g} FLOPs, "
      f"{f['bytes_accessed'] * f['grad_accum']:.3g} bytes accessed ({accum}as compiled: "
      f"{f['flops']:.3g}, {f['bytes_accessed']:.3g})",
      f"roofline ({g.name}: {peak.flops / 1e12:.0f} TFLOP/s bf16, {g.hbm_bandwidth / 1e9:.0f} "
      f"GB/s HBM per chip, {g.source}): compute {f['compute_s']:.3g} s, memory "
      f"{f['memory_s']:.3g} s: step about {f['step_s']:.3g} s "
      f"({'compute' if f['compute_s'] >= f['memory_s'] else 'memory'}-bound)",
      f"tokens/s for the slice: about {f['tokens_per_s']:,.0f} ({f['tokens_per_step']:,} tokens a "
      f"step; communication between chips not counted)",
  ])


def does_not_fit_report(f: dict, changes: list[tuple[str, str]] | None = None) -> str:
  consumers = sorted([
      ("temporaries (the compiler's: activations, gradients, updates)", f["temp_bytes"]),
      ("optimizer state", f["opt_state_bytes"]),
      ("parameters", f["params_bytes"]),
      ("batch", f["batch_bytes"]),
  ], key=lambda c: -c[1])
  consumers = [c for c in consumers if c[1] >= 2**20]
  lines = [
      f"does not fit: needs {f['total_bytes'] / 2**30:,.2f} of {f['allowed_bytes'] / 2**30:,.2f} "
      f"GiB per {_unit(f)} ({f['topology']}, mesh "
      f"{' x '.join(f'{k} {v}' for k, v in f['mesh'].items())})",
      *(f"  {name}: {_gib(size)}" for name, size in consumers),
      f"  ({_allowed(f)}; compiled in {f['compile_s']:.0f}s)",
      *(f"note: {n}" for n in f["notes"]),
      *_placement(f),
  ]
  if "flops" in f:  # compiled: XLA checks the temporaries alone against its limit
    lines.append(f"note: the compiler accepted the temporaries ({_gib(f['temp_bytes'])}); the "
                 "parameters, optimizer state and batch are in HBM beside them")
  if changes is None:
    changes = advise(f)
  if changes:
    lines.append(f"changes that shrink it (parameters + optimizer state per {_unit(f)}, exact; "
                 "temporaries need a compile: add them and run again, or --search):")
    lines += [f"  {change}: {why}" for change, why in changes]
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Advice.


def mesh_candidates(cfg: config_lib.Config, n: int) -> list[dict[str, object]]:
  """Every (data, fsdp, memory) over `n` devices the config allows, as mesh overrides; with
  fsdp > 1 and a value table, also with the table's rows over fsdp."""
  model = cfg.model
  found = []
  for memory in range(1, n + 1):
    if n % memory or (memory > 1 and (not model.memory.enabled or model.value_dim % memory)):
      continue
    for fsdp in range(1, n // memory + 1):
      if (n // memory) % fsdp:
        continue
      mesh = {"mesh.data": n // memory // fsdp, "mesh.fsdp": fsdp, "mesh.memory": memory,
              "mesh.table_rows_over_fsdp": False}
      found.append(mesh)
      if fsdp > 1 and model.memory.enabled:
        found.append(mesh | {"mesh.table_rows_over_fsdp": True})
  return found


def _command(changes: dict[str, object]) -> str:
  return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items())


def advise(f: dict) -> list[tuple[str, str]]:
  """Changes that shrink the step: meshes (with the exact parameter and optimizer-state bytes per
  device they give), the moments' dtype, recomputing activations when the temporaries outweigh
  the state, the micro-batch and the sequence length."""
  from jax.experimental import topologies

  cfg, n = f["config"], f["devices"]
  devices = topologies.get_topology_desc(
      platform="tpu", topology_name=f["libtpu_topology"]).devices
  state_now = f["params_bytes"] + f["opt_state_bytes"]
  changes = []
  mesh_now = {"mesh.data": f["mesh"]["data"], "mesh.fsdp": f["mesh"]["fsdp"],
              "mesh.memory": f["mesh"]["memory"],
              "mesh.table_rows_over_fsdp": cfg.mesh.table_rows_over_fsdp}
  by_mesh = []
  shapes = state_lib.abstract_state(cfg)
  for mesh in mesh_candidates(cfg, n):
    if mesh == mesh_now:
      continue
    candidate = with_overrides(cfg, mesh)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      params, opt_state, _ = state_bytes(
          candidate, sharding.make_mesh(candidate.mesh, devices), shapes)
    by_mesh.append((params + opt_state, mesh))

  def changed(mesh):
    return sum(mesh[k] != mesh_now[k] for k in mesh)

  picks = [
      # The table's columns over as many chips as divide it, nothing else changed: the memory
      # axis the layer is built for (no gather at use).
      [c for c in by_mesh if c[1]["mesh.fsdp"] == mesh_now["mesh.fsdp"]
       and c[1]["mesh.table_rows_over_fsdp"] == mesh_now["mesh.table_rows_over_fsdp"]],
      # The least state with the table's rows whole, then with them over fsdp too.
      [c for c in by_mesh if not c[1]["mesh.table_rows_over_fsdp"]],
      [c for c in by_mesh if c[1]["mesh.table_rows_over_fsdp"]],
  ]
  named = set()
  for pool in picks:
    if not pool:
      continue
    state, mesh = min(pool, key=lambda c: (c[0], changed(c[1])))
    diff = {k: v for k, v in mesh.items() if v != mesh_now[k]}
    if state >= state_now or _command(diff) in named:
      continue
    named.add(_command(diff))
    what = []
    if "mesh.memory" in diff:
      what.append(f"the value table's columns over {mesh['mesh.memory']} chips"
                  if mesh["mesh.memory"] > 1 else "the value table's columns whole")
    if "mesh.fsdp" in diff:
      what.append(f"dense weights over fsdp {mesh['mesh.fsdp']}")
    if mesh["mesh.table_rows_over_fsdp"]:
      what.append("the table's rows over fsdp too (gathered at each use)")
    changes.append((_command(diff), f"{'; '.join(what) or 'another mesh'}: {_gib(state_now)} -> "
                    f"{_gib(state)}"))
  if cfg.optim.state_dtype == "float32":
    changes.append(("optim.state_dtype=bfloat16", f"Adam moments in bfloat16: optimizer state "
                    f"{_gib(f['opt_state_bytes'])} -> {_gib(f['opt_state_bytes'] / 2)}"))
  if f["temp_bytes"] > state_now:  # activations dominate: recompute them in the backward
    recomputes = {
        "none": "",
        "attention": "the backward recomputes attention's (B, H, T, T) probabilities from the "
                     "kept queries, keys and values instead of keeping them: about one more "
                     "QK^T matmul a block",
        "block": "the backward recomputes each block from its input, keeping only that: the "
                 "least memory, for a second forward (about a third more FLOPs)",
    }
    more = list(recomputes)[list(recomputes).index(cfg.model.remat) + 1:]
    changes += [(f"model.remat={name}", recomputes[name]) for name in more]
  train = cfg.train
  micro = train.batch_size // train.grad_accum
  if micro > n and train.batch_size % (2 * train.grad_accum * n) == 0:
    changes.append((f"train.grad_accum={train.grad_accum * 2}", f"half the micro-batch ({micro} "
                    f"-> {micro // 2} sequences): the activations' temporaries roughly halve; the "
                    f"step's tokens stay {f['tokens_per_step']:,}"))
  elif micro == n:
    changes.append((f"train.seq_len={train.seq_len // 2}", "one sequence per device already: "
                    "shorter sequences are the last lever on the activations (attention's grows "
                    "with the square of the length)"))
  return changes


def search(cfg: config_lib.Config, topology: str, pinned: dict[str, object] | None = None,
           out=print) -> dict | None:
  """Compiles cfg at every mesh `mesh_candidates` gives (those that keep the `pinned` mesh
  fields); prints one line each and the best that fits: the shortest roofline step, ties going
  to the least memory per device. A mesh whose parameters and optimizer state alone exceed what
  the compiler allows is not compiled."""
  from jax.experimental import topologies

  libtpu_name = parse_topology(topology)[0]
  devices = topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name).devices
  allowed = allowed_hbm(devices[0])
  pinned = pinned or {}
  shapes = state_lib.abstract_state(cfg)
  results = []
  for mesh in mesh_candidates(cfg, len(devices)):
    if any(str(mesh[k]).lower() != str(v).lower() for k, v in pinned.items()):
      continue
    candidate = with_overrides(cfg, mesh)
    if allowed is not None:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, opt_state, _ = state_bytes(
            candidate, sharding.make_mesh(candidate.mesh, devices), shapes)
      if params + opt_state > allowed:
        out(f"{_command(mesh)}: does not fit: parameters + optimizer state alone "
            f"{_gib(params + opt_state)} of {_gib(allowed)} (not compiled)")
        continue
    f = compile_for(candidate, topology)
    results.append((mesh, f))
    verdict = (f"fits, step about {f['step_s']:.3g} s, {f['tokens_per_s']:,.0f} tokens/s"
               if f["fits"] else "does not fit")
    split = f" (split torus axes: {', '.join(f['split_axes'])})" if f["split_axes"] else ""
    out(f"{_command(mesh)}: {_gib(f['total_bytes'])} of {_gib(f['allowed_bytes'])}, {verdict}"
        f"{split}; compiled in {f['compile_s']:.0f}s")
  fitting = [(mesh, f) for mesh, f in results if f["fits"]]
  if not fitting:
    out(f"does not fit: none of the meshes tried fits {topology}")
    return None
  mesh, best = min(fitting, key=lambda r: (r[1]["step_s"], r[1]["total_bytes"]))
  out(f"best (the shortest roofline step, then the least memory): {_command(mesh)}")
  out(report(best))
  return best


@cli.entry_point
def main(argv: list[str]) -> int:
  if "-h" in argv or "--help" in argv:
    print(__doc__)
    return 0
  do_search = "--search" in argv
  argv = [a for a in argv if a != "--search"]
  path, options, overrides = config_loading.split_command_line(argv, ("topology",))
  topology = options.get("topology")
  if topology is None:
    raise config_lib.ConfigError("topology", "give topology=<Cloud TPU name>, e.g. v5p-8")
  cfg = config_loading.load(path, overrides)
  if do_search:  # mesh fields given on the command line stay as given
    pinned = {k: v for k, _, v in (o.partition("=") for o in overrides) if k.startswith("mesh.")}
    pinned = {k: v for k, v in pinned.items() if k != "mesh.data" or v != "-1"}
    return 0 if search(cfg, topology, pinned) else EXIT_DOES_NOT_FIT
  figures = compile_for(cfg, topology)
  print(report(figures))
  return 0 if figures["fits"] else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
