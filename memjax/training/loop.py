"""The training program behind `train.py`: setup, the step loop, eval, checkpoints and logs.

`setup` builds everything a run needs (mesh, sharded state, data iterator, checkpointer) and
resumes from the run directory's newest checkpoint; `run` drives the jitted, ahead-of-time
compiled step and the periodic eval, logging and saving.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import uuid
from typing import Callable

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from memjax import cache
from memjax import checkpoint as checkpoint_lib
from memjax import config_loading
from memjax import distributed
from memjax import hardware
from memjax import optim
from memjax import paths
from memjax import sharding
from memjax.config import Config, ConfigError, to_dict
from memjax.data import DataError
from memjax.training import evaluation, inputs as inputs_lib, step as step_lib
from memjax.training import state as state_lib
from memjax.training import monitor
from memjax.training.metrics import MetricsWriter, check_tensorboard_dir, check_wandb


class NonFiniteLoss(RuntimeError):
  """Too many non-finite steps in a row; the message says what to try."""


@dataclasses.dataclass
class Run:
  cfg: Config
  run_dir: epath.Path  # local, or an object store's URI (gs://...)
  mesh: jax.sharding.Mesh
  state: state_lib.TrainState
  inputs: inputs_lib.Inputs
  checkpointer: checkpoint_lib.Checkpointer
  start_step: int


def prepare_run_dir(run_dir: epath.Path) -> None:
  """Creates the directory and proves it writable, before anything is computed."""
  check = run_dir / f".write-check-{uuid.uuid4().hex}"  # one per process
  try:
    if not paths.is_remote(run_dir):  # an object store has no folders (gcsfs would make a bucket)
      run_dir.mkdir(parents=True, exist_ok=True)
    check.write_bytes(b"")
    check.unlink()
  except OSError as error:
    reason = error.strerror or str(error).partition("\n")[0]
    if paths.is_remote(run_dir) and isinstance(error, FileNotFoundError):
      reason = "no such bucket"  # gcsfs names only the upload URL
    raise ConfigError(
        "train.run_dir", f"cannot write to {run_dir} ({reason}); choose another"
    ) from None


def setup(
    cfg: Config, run_dir: epath.Path, mesh: jax.sharding.Mesh, log: Callable[[str], None] = print
) -> Run:
  if cfg.train.tensorboard:
    check_tensorboard_dir(run_dir)
  check_wandb(cfg.train.wandb)
  prepare_run_dir(run_dir)
  if cfg.train.batch_size % (jax.device_count() * cfg.train.grad_accum):
    raise ConfigError(
        "train.batch_size",
        f"must be a multiple of the {jax.device_count()} devices times train.grad_accum="
        f"{cfg.train.grad_accum}, got {cfg.train.batch_size}",
    )
  checkpointer = checkpoint_lib.Checkpointer(
      run_dir, every=cfg.train.checkpoint_every, keep=cfg.train.keep_checkpoints
  )
  latest = checkpointer.latest_step()
  inputs = inputs_lib.make_inputs(
      cfg, process_index=jax.process_index(), process_count=jax.process_count()
  )
  if latest is not None:
    if not cfg.train.resume:
      checkpointer.close()
      raise ConfigError(
          "train.resume",
          f"{run_dir} holds checkpoints (newest: step {latest}) and resume is off; choose "
          "another train.run_dir or set train.resume=true (nothing was overwritten)",
      )
    abstract = state_lib.abstract_state(cfg, mesh)
    try:
      state, data_state = checkpointer.restore(latest, abstract, inputs.train)
      inputs.train.set_state(data_state)
    except (checkpoint_lib.CheckpointMismatch, DataError):
      checkpointer.close()
      inputs.train.close()
      raise
    log(f"resumed from {checkpointer.directory / str(latest)}")
    change = optim.schedule_change(checkpointer.saved_config(latest), cfg, latest)
    if change:
      log(change)
  else:
    state = state_lib.create_state(cfg, mesh)
  if jax.process_index() == 0:  # this start's resolved config (a refused start writes nothing)
    (run_dir / "config.yaml").write_text(config_loading.to_yaml(cfg))
  return Run(cfg, run_dir, mesh, state, inputs, checkpointer, int(state.step))


def _gib(n_bytes: int) -> str:
  return f"{n_bytes / 2**20:,.1f} MiB" if n_bytes < 2**30 else f"{n_bytes / 2**30:,.2f} GiB"


def compile_train_step(run: Run):
  """Jits the step with explicit shardings and donation, compiles it ahead of time, and reports
  per-device memory from the compiled program."""
  jitted, abstract_args = step_lib.jit_train_step(run.cfg, run.mesh)
  start = time.perf_counter()
  compiled = jitted.lower(*abstract_args()).compile()
  params = state_lib.tree_bytes_per_device(run.state.params)
  opt = state_lib.tree_bytes_per_device(run.state.opt_state)
  memory = compiled.memory_analysis()
  temps = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
  line = f"compiled train step in {time.perf_counter() - start:.1f}s; per device: parameters {_gib(params)}, optimizer state {_gib(opt)}"
  line += f", temporaries {_gib(temps)}" if temps is not None else ", temporaries n/a on this backend"
  return compiled, line


def _global_batch(run: Run, local_BT: np.ndarray) -> jax.Array:
  return jax.make_array_from_process_local_data(sharding.batch_sharding(run.mesh), local_BT)


def evaluate(
    run: Run, evals: list[evaluation.Eval], eval_step: Callable, batches: list[jax.Array]
) -> dict[str, dict[str, float]]:
  """Runs every eval on the current state, through one shared context; metrics by eval name."""
  ctx = evaluation.EvalContext(
      run.state, eval_step=eval_step, batches=batches, memory=run.cfg.model.memory
  )
  return {ev.name: ev(ctx) for ev in evals}


def _merged(results: dict[str, dict[str, float]]) -> dict[str, float]:
  return {k: v for metrics in results.values() for k, v in metrics.items()}


def _eval_lines(evals: list[evaluation.Eval], results: dict[str, dict[str, float]]) -> list[str]:
  return [line for ev in evals for line in ev.lines(results[ev.name])]


def _speed(step_s: float | None, tokens_per_step: int, step_flops: float | None,
           device_kind: str) -> dict[str, float]:
  """Step time, tokens/s and (on a device of known peak) MFU; nothing for an untimed window."""
  if step_s is None:
    return {}
  out = {"train/step_time_s": step_s, "train/tokens_per_s": tokens_per_step / step_s}
  mfu = hardware.mfu(step_flops, step_s, device_kind)
  if mfu is not None:
    out["train/mfu"] = mfu
  return out


def _memory() -> dict[str, int]:
  """The device memory this process's devices have in use (the most of any); none on CPU."""
  memory = hardware.memory_in_use(jax.local_devices())
  return {f"memory/{k}": v for k, v in memory.items()} if memory else {}


def _progress(logged: dict[str, float], short: bool = False) -> str:
  """A log line's figures: the full line of a log file, or the progress bar's short one."""
  parts = [f"loss {logged['train/loss']:.{3 if short else 4}f}"]
  if not short:
    lr = f"lr {logged['train/lr']:.3g}"
    if "train/lr_values" in logged:
      lr += f" (table {logged['train/lr_values']:.3g})"
    parts.append(lr)
  if "train/step_time_s" in logged:
    parts.append(f"{logged['train/step_time_s']:.3g} s/step")
    parts.append(f"{logged['train/tokens_per_s']:,.0f} tokens/s")
  if "train/mfu" in logged:
    parts.append(f"MFU {100 * logged['train/mfu']:.1f}%")
  if "memory/bytes_in_use" in logged and not short:
    parts.append(f"memory {_gib(logged['memory/bytes_in_use'])} (peak "
                 f"{_gib(logged['memory/peak_bytes_in_use'])})")
  return ", ".join(parts)


def _quiet(line: str) -> None:
  del line


def run(
    cfg: Config, run_dir: epath.PathLike, log: Callable[[str], None] = print
) -> dict[str, float]:
  """Trains `cfg` in `run_dir` (resuming when it holds checkpoints); returns the final metrics.

  `train.stop_after` ends this invocation after that many steps with a checkpoint, as a
  time-limited job would; running again continues where it stopped.
  """
  joined = distributed.initialize(cfg.distributed)
  if jax.process_index() != 0:
    log = _quiet  # every process computes the same global figures; the first one reports them
  if joined:
    log(f"distributed: {joined}")
  run_dir = epath.Path(run_dir)  # pathlib would turn gs://bucket/x into the folder gs:/bucket/x
  cache.use_compilation_cache(cfg.train.compilation_cache)
  mesh = sharding.make_mesh(cfg.mesh)
  with jax.set_mesh(mesh):  # the memory layers read it to split the lookup over `memory`
    return _run(cfg, run_dir, mesh, log)


def _run(
    cfg: Config, run_dir: epath.Path, mesh: jax.sharding.Mesh, log: Callable[[str], None]
) -> dict[str, float]:
  run = setup(cfg, run_dir, mesh, log)
  graphdef = state_lib.model_graphdef(cfg)
  compiled, memory_line = compile_train_step(run)
  log(memory_line)
  step_flops = hardware.compiled_flops(compiled, cfg.train.grad_accum)  # per device
  device_kind = jax.devices()[0].device_kind
  peak = hardware.peak(device_kind)
  if step_flops is None:
    log("MFU not logged: the compiled step reports no FLOPs")
  elif peak is None:
    log(f"MFU not logged: memjax.hardware has no bf16 peak for {device_kind}")
  else:
    log(f"MFU against {device_kind}'s bf16 peak, {peak.flops / 1e12:,.0f} TFLOP/s ({peak.source})")
  evals = evaluation.make_evals(cfg, run.inputs, graphdef, run.mesh)
  eval_step = jax.jit(step_lib.make_eval_step(cfg, graphdef))
  eval_batches = [_global_batch(run, batch) for batch in run.inputs.eval_batches]
  n_params = sum(x.size for x in jax.tree.leaves(run.state.params))
  log(f"model: {n_params / 1e6:.2f}M parameters; data: {run.inputs.description}; run dir: {run_dir}")

  primary = jax.process_index() == 0
  writer = MetricsWriter(run_dir, tensorboard=cfg.train.tensorboard, primary=primary,
                         wandb=cfg.train.wandb, config=to_dict(cfg))
  profiler = monitor.Profiler(
      cfg.train.profile_steps if cfg.train.profile else None, run_dir / "profile", log)
  train = cfg.train
  tokens_per_step = train.batch_size * train.seq_len
  results: dict[str, dict[str, float]] = {}  # the last evaluation's, by eval name
  last_loss = math.nan
  started = time.perf_counter()
  try:
    pending = []
    clock = monitor.StepClock()
    interactive = sys.stderr.isatty()
    with tqdm(
        total=train.steps, initial=run.start_step, unit="step", dynamic_ncols=True,
        mininterval=0.5 if interactive else 30.0, disable=not primary,
    ) as bar:
      say = bar.write if primary else _quiet
      last = min(train.steps, run.start_step + train.stop_after) if train.stop_after else train.steps
      for step in range(run.start_step + 1, last + 1):
        batch = _global_batch(run, next(run.inputs.train))
        profiler.before(step)
        run.state, metrics = compiled(run.state, batch)
        pending.append(metrics)
        if step == run.start_step + 1:  # untimed: see memjax.training.monitor
          jax.block_until_ready(metrics)
          clock.restart()
        else:
          clock.tick()
        if profiler.after(step, run.state):
          clock.restart()
        bar.update(1)
        if step % train.log_every == 0 or step == train.steps:
          values = jax.device_get(pending)
          pending = []
          step_s = clock.read()
          finite = [v for v in values if v["finite"]]
          logged = {
              "train/loss": float(np.mean([v["loss"] for v in finite])) if finite else math.nan,
              "train/lr": float(values[-1]["lr"]),
              "train/grad_norm_dense": float(values[-1]["grad_norm/dense"]),
              "train/grad_norm_values": float(values[-1]["grad_norm/values"]),
              "train/skipped_steps": int(run.state.skipped),
          }
          if "lr_values" in values[-1]:  # memory models
            logged["train/lr_values"] = float(values[-1]["lr_values"])
          logged.update(_speed(step_s, tokens_per_step, step_flops, device_kind))
          logged.update(_memory())
          writer.write(step, logged)
          last_loss = logged["train/loss"]
          bar.set_postfix_str(_progress(logged, short=True))
          if not interactive:  # a log file gets a line per log_every; a terminal has the bar
            say(f"step {step}: {_progress(logged)}")
        if int(run.state.bad_steps) >= train.nan_patience:
          raise NonFiniteLoss(
              f"{train.nan_patience} steps in a row had a non-finite loss or gradient (step "
              f"{step}); their updates were skipped. Lower optim.lr, raise optim.warmup, or use "
              "float32 compute (model.dtype=float32). The last checkpoint is kept."
          )
        if step % train.eval_every == 0 or step == train.steps:
          results = evaluate(run, evals, eval_step, eval_batches)
          writer.write(step, _merged(results))
          for line in _eval_lines(evals, results):
            say(f"step {step}: {line}")
          clock.restart()
        if run.checkpointer.save(
            step, run.state, run.inputs.train.get_state(), cfg, force=step == last
        ):
          clock.restart()
    if run.start_step >= train.steps:
      log(f"{run_dir} already holds the final step {train.steps}; evaluating it")
      results = evaluate(run, evals, eval_step, eval_batches)
      for line in _eval_lines(evals, results):
        log(line)
  finally:
    profiler.stop()
    run.checkpointer.wait_until_finished()
    run.checkpointer.close()
    writer.close()
    if hasattr(run.inputs.train, "close"):
      run.inputs.train.close()  # stops the prefetch thread
  steps_run = int(run.state.step) - run.start_step
  summary = [f"{steps_run} steps in {time.perf_counter() - started:.0f}s"]
  if steps_run:
    summary.append(f"train loss {last_loss:.4f}")
  summary += [part for ev in evals if (part := ev.summary(results.get(ev.name, {})))]
  log("summary: " + "; ".join(summary))
  log(
      f"done: step {int(run.state.step)} of {train.steps}; checkpoints in {run.checkpointer.directory}, metrics in "
      f"{writer.path}" + (f", TensorBoard in {run_dir / 'tensorboard'}" if train.tensorboard else "")
  )
  return _merged(results)


def default_run_dir(config_name: str) -> epath.Path:
  return epath.Path(os.environ.get("MEMJAX_RUNS", "runs")) / epath.Path(config_name).stem
