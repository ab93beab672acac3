"""The training program behind `train.py`: setup, the step loop, eval, checkpoints and logs.

`setup` builds everything a run needs (mesh, sharded state, data iterator, checkpointer) and
resumes from the run directory's newest checkpoint; `run` drives the jitted, ahead-of-time
compiled step and the periodic eval, logging and saving.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
import tempfile
import time
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from memjax import checkpoint as checkpoint_lib
from memjax import distributed
from memjax import sharding
from memjax.config import Config, ConfigError
from memjax.data import DataError
from memjax.training import evaluation, inputs as inputs_lib, step as step_lib
from memjax.training import state as state_lib
from memjax.training.metrics import MetricsWriter


class NonFiniteLoss(RuntimeError):
  """Too many non-finite steps in a row; the message says what to try."""


@dataclasses.dataclass
class Run:
  cfg: Config
  run_dir: pathlib.Path
  mesh: jax.sharding.Mesh
  state: state_lib.TrainState
  inputs: inputs_lib.Inputs
  checkpointer: checkpoint_lib.Checkpointer
  start_step: int


def prepare_run_dir(run_dir: pathlib.Path) -> None:
  """Creates the directory and proves it writable, before anything is computed."""
  try:
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-check-"):
      pass
  except OSError as error:
    raise ConfigError(
        "train.run_dir", f"cannot write to {run_dir} ({error.strerror or error}); choose another"
    ) from None


def setup(
    cfg: Config, run_dir: pathlib.Path, mesh: jax.sharding.Mesh, log: Callable[[str], None] = print
) -> Run:
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
  else:
    state = state_lib.create_state(cfg, mesh)
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


def _quiet(line: str) -> None:
  del line


def run(
    cfg: Config, run_dir: str | pathlib.Path, log: Callable[[str], None] = print
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
  run_dir = pathlib.Path(run_dir)
  mesh = sharding.make_mesh(cfg.mesh)
  with jax.set_mesh(mesh):  # the memory layers read it to split the lookup over `memory`
    return _run(cfg, run_dir, mesh, log)


def _run(
    cfg: Config, run_dir: pathlib.Path, mesh: jax.sharding.Mesh, log: Callable[[str], None]
) -> dict[str, float]:
  run = setup(cfg, run_dir, mesh, log)
  graphdef = state_lib.model_graphdef(cfg)
  compiled, memory_line = compile_train_step(run)
  log(memory_line)
  evals = evaluation.make_evals(cfg, run.inputs, graphdef, run.mesh)
  eval_step = jax.jit(step_lib.make_eval_step(cfg, graphdef))
  eval_batches = [_global_batch(run, batch) for batch in run.inputs.eval_batches]
  n_params = sum(x.size for x in jax.tree.leaves(run.state.params))
  log(f"model: {n_params / 1e6:.2f}M parameters; data: {run.inputs.description}; run dir: {run_dir}")

  primary = jax.process_index() == 0
  writer = MetricsWriter(run_dir, tensorboard=cfg.train.tensorboard, primary=primary)
  train = cfg.train
  tokens_per_step = train.batch_size * train.seq_len
  results: dict[str, dict[str, float]] = {}  # the last evaluation's, by eval name
  last_loss = math.nan
  started = time.perf_counter()
  try:
    pending = []
    timer = time.perf_counter()
    timed_steps = 0
    interactive = sys.stderr.isatty()
    with tqdm(
        total=train.steps, initial=run.start_step, unit="step", dynamic_ncols=True,
        mininterval=0.5 if interactive else 30.0, disable=not primary,
    ) as bar:
      say = bar.write if primary else _quiet
      last = min(train.steps, run.start_step + train.stop_after) if train.stop_after else train.steps
      for step in range(run.start_step + 1, last + 1):
        batch = _global_batch(run, next(run.inputs.train))
        run.state, metrics = compiled(run.state, batch)
        pending.append(metrics)
        timed_steps += 1
        bar.update(1)
        if step % train.log_every == 0 or step == train.steps:
          values = jax.device_get(pending)
          pending = []
          rate = timed_steps * tokens_per_step / (time.perf_counter() - timer)
          timer, timed_steps = time.perf_counter(), 0
          finite = [v for v in values if v["finite"]]
          logged = {
              "train/loss": float(np.mean([v["loss"] for v in finite])) if finite else math.nan,
              "train/lr": float(values[-1]["lr"]),
              "train/grad_norm_dense": float(values[-1]["grad_norm/dense"]),
              "train/grad_norm_values": float(values[-1]["grad_norm/values"]),
              "train/tokens_per_s": rate,
              "train/skipped_steps": int(run.state.skipped),
          }
          writer.write(step, logged)
          last_loss = logged["train/loss"]
          bar.set_postfix(loss=f"{logged['train/loss']:.3f}", tok_s=f"{rate:,.0f}")
          if not interactive:  # a log file gets a line per log_every; a terminal has the bar
            say(f"step {step}: loss {logged['train/loss']:.4f} ({rate:,.0f} tokens/s)")
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
        run.checkpointer.save(
            step, run.state, run.inputs.train.get_state(), cfg, force=step == last
        )
    if run.start_step >= train.steps:
      log(f"{run_dir} already holds the final step {train.steps}; evaluating it")
      results = evaluate(run, evals, eval_step, eval_batches)
      for line in _eval_lines(evals, results):
        log(line)
  finally:
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


def default_run_dir(config_name: str) -> pathlib.Path:
  return pathlib.Path(os.environ.get("MEMJAX_RUNS", "runs")) / pathlib.Path(config_name).stem
