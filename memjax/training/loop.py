"""The training program behind `train.py`: setup, the step loop, eval, checkpoints and logs.

`setup` builds everything a run needs (mesh, sharded state, data iterator, checkpointer) and
resumes from the run directory's newest readable checkpoint (or `train.resume_step`), refusing a
config that changes the model or its data; `run` drives the jitted, ahead-of-time compiled step
and the periodic eval, logging and saving. A checkpoint is written only from a state whose last
step was applied; a failed save or a run of skipped steps ends the run with one message.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
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
from memjax.training.metrics import MetricsWriter, check_tensorboard_dir, check_wandb, drop_after


class NonFiniteLoss(RuntimeError):
  """Too many skipped (non-finite or spiking) steps in a row; the message says what to try and
  the command that continues from the last healthy checkpoint."""


def _continue_command(step: int) -> str:
  """This invocation's command with train.resume_step=STEP (when run as train.py)."""
  argv = [a for a in sys.argv if not a.startswith("train.resume_step=")]
  if not argv or not argv[0].endswith("train.py"):
    return f"the same command with train.resume_step={step}"
  return shlex.join(["python", *argv, f"train.resume_step={step}"])


def _diverged(cfg: Config, step: int, checkpointer: checkpoint_lib.Checkpointer) -> NonFiniteLoss:
  train = cfg.train
  why = "a non-finite loss, gradient or parameter"
  if train.loss_spike_factor:
    why += f", or a loss above {train.loss_spike_factor:g}x its running mean"
  checkpointer.wait_until_finished()
  healthy = checkpointer.latest_step()
  if healthy is None:
    advice = "no checkpoint was written; start again in a new train.run_dir"
  else:
    advice = (f"then continue from the last healthy checkpoint, step {healthy}: "
              f"{_continue_command(healthy)}")
  return NonFiniteLoss(
      f"training diverged: {train.nan_patience} steps in a row up to step {step} were skipped "
      f"({why}). Lower optim.lr or raise optim.warmup (or use model.dtype=float32), {advice}"
  )


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


# Fields a resume may change: how the model is computed (not what), and where the data lives.
# Every other model.* and data.* field changes the function or the data, and is refused.
_MAY_CHANGE = (
    "model.remat", "model.dtype", "model.memory.impl", "model.moe.impl", "model.peer.impl",
    "model.moe.block", "model.memory.input_dropout", "model.memory.query_dropout",
    "model.memory.value_dropout", "data.data_dir", "data.root_dir", "data.path",
    "data.eval_path", "data.eval_split", "data.tokenizer_path", "data.prefetch", "data.shards",
)


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def check_config_change(saved: dict, cfg: Config, step: int, run_dir: epath.Path) -> str | None:
  """Raises ConfigError for the first field that changes the model or its data since the
  checkpoint; returns one line naming the other changed fields (None when none did). The
  schedule's fields are left to `optim.schedule_change`, and fields the checkpoint predates are
  not changes."""
  old, new = _flat(saved), _flat(to_dict(cfg))
  changed = [k for k in new if k in old and old[k] != new[k]]
  for field in changed:
    if field.startswith(("model.", "data.")) and field not in _MAY_CHANGE:
      raise ConfigError(
          field,
          f"the checkpoint of step {step} in {run_dir} was trained with {old[field]!r}, this "
          f"config has {new[field]!r}, which changes the model or its data; set it back, or "
          "choose another train.run_dir",
      )
  rest = [f"{k} {old[k]!r} -> {new[k]!r}" for k in changed if k not in optim.SCHEDULE_FIELDS
          and k != "train.resume_step"]
  return f"changed since the checkpoint of step {step}: {', '.join(rest)}" if rest else None


def _restore_readable(checkpointer: checkpoint_lib.Checkpointer, abstract, data_shards,
                      log: Callable[[str], None], upto: int | None = None):
  """(step, saved config, state, data state) of the newest checkpoint (up to step `upto`) that
  can be read; each damaged one is reported. One of another model (CheckpointMismatch) is
  refused, not skipped."""
  damaged = []
  for step in reversed([s for s in checkpointer.steps() if upto is None or s <= upto]):
    try:
      saved = checkpointer.saved_config(step)
      state, data_state = checkpointer.restore(step, abstract, data_shards)
    except checkpoint_lib.UnreadableCheckpoint as error:
      log(f"warning: {error}; trying the checkpoint before it")
      damaged.append(step)
      continue
    return step, saved, state, data_state
  raise checkpoint_lib.CheckpointError(
      f"no checkpoint in {checkpointer.directory} can be read (steps {damaged}; the reasons are "
      "above); move them away to start again, or choose another train.run_dir"
  )


def _continued_from(checkpointer: checkpoint_lib.Checkpointer, step: int) -> int | None:
  """The train.resume_step of the run that wrote checkpoint `step`."""
  try:
    return checkpointer.saved_config(step).get("train", {}).get("resume_step") or None
  except checkpoint_lib.UnreadableCheckpoint:
    return None


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
  if cfg.train.resume_step and cfg.train.resume:
    if cfg.train.resume_step not in checkpointer.steps():
      checkpointer.close()
      raise ConfigError(
          "train.resume_step",
          f"{run_dir} holds no checkpoint of step {cfg.train.resume_step} (it holds "
          f"{checkpointer.steps() or 'none'})",
      )
  latest = checkpointer.latest_step()
  upto = cfg.train.resume_step or None
  if (upto and latest is not None and latest > upto
      and _continued_from(checkpointer, latest) == upto):
    # The run that train.resume_step started has checkpointed since: rerunning its command
    # (a time-limited job) continues it instead of going back again.
    log(f"train.resume_step={upto}: continued from it already; resuming from step {latest}")
    upto = None
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
      latest, saved, state, data_state = _restore_readable(
          checkpointer, abstract, inputs.train, log, upto)
      inputs.train.set_state(data_state)
    except (checkpoint_lib.CheckpointError, DataError):
      checkpointer.close()
      inputs.train.close()
      raise
    try:
      others = check_config_change(saved, cfg, latest, run_dir)
    except ConfigError:
      checkpointer.close()
      inputs.train.close()
      raise
    # Newer checkpoints (damaged, or past train.resume_step) would be resumed by the next start
    # and collide with this run's saves: they are moved, never deleted.
    moved = checkpointer.set_aside_after(latest)
    if moved:
      log(f"moved the checkpoints of steps {moved} to {run_dir / 'set_aside'} (kept, not used)")
    log(f"resumed from {checkpointer.directory / str(latest)}")
    if others:
      log(others)
    change = optim.schedule_change(saved, cfg, latest)
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
  if primary:  # rows of steps after the checkpoint are logged again: drop the old ones
    drop_after(run_dir, run.start_step)
  writer = MetricsWriter(run_dir, tensorboard=cfg.train.tensorboard, primary=primary,
                         wandb=cfg.train.wandb, config=to_dict(cfg))
  profiler = monitor.Profiler(
      cfg.train.profile_steps if cfg.train.profile else None, run_dir / "profile", log)
  train = cfg.train
  tokens_per_step = train.batch_size * train.seq_len
  results: dict[str, dict[str, float]] = {}  # the last evaluation's, by eval name
  last_loss = math.nan
  started = time.perf_counter()
  owed = False  # a checkpoint due while the last steps were skipped: written at the next healthy
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
        run.checkpointer.check_for_errors()  # a failed background save ends the run now
        bad_steps = int(run.state.bad_steps)
        if bad_steps >= train.nan_patience:
          raise _diverged(cfg, step, run.checkpointer)
        if step % train.eval_every == 0 or step == train.steps:
          results = evaluate(run, evals, eval_step, eval_batches)
          writer.write(step, _merged(results))
          for line in _eval_lines(evals, results):
            say(f"step {step}: {line}")
          clock.restart()
        owed |= step == last or run.checkpointer.due(step)
        if owed and bad_steps:
          say(f"step {step}: checkpoint postponed, the last {bad_steps} steps were skipped")
        elif owed and run.checkpointer.save(
            step, run.state, run.inputs.train.get_state(), cfg, force=True
        ):
          owed = False
          clock.restart()
    if run.start_step >= train.steps:
      log(f"{run_dir} already holds the final step {train.steps}; evaluating it")
      results = evaluate(run, evals, eval_step, eval_batches)
      for line in _eval_lines(evals, results):
        log(line)
  finally:
    profiler.stop()
    failing = sys.exc_info()[1] is not None
    try:
      run.checkpointer.wait_until_finished()
    except checkpoint_lib.CheckpointError:
      if not failing:  # else the error in flight is the one to report
        raise
    finally:
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
