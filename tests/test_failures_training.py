"""Training's failure paths (issue 17): each ends the run with one clear message, deletes or
overwrites no checkpoint, and a later good run continues."""

import dataclasses
import errno
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from memjax import checkpoint, optim, sharding
from memjax.training import loop, state as state_lib, step as step_lib

from support.training import logged, smoke_config


def snapshot(directory: pathlib.Path) -> dict:
  return {str(p.relative_to(directory)): p.read_bytes()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def steps_saved(run_dir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def quiet(line: str) -> None:
  del line


def with_train(cfg, **changes):
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def test_a_file_in_place_of_the_checkpoints_folder_ends_the_run_at_once(tmp_path, data_dir):
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  (run_dir / "checkpoints").write_text("not a folder")
  cfg = smoke_config(data_dir)
  started = time.monotonic()
  with pytest.raises(checkpoint.CheckpointError) as caught:
    loop.run(cfg, run_dir, log=quiet)
  assert time.monotonic() - started < 60  # it used to wait for a signal that never came
  assert str(caught.value).splitlines()[0] == (
      f"cannot write checkpoints to {run_dir / 'checkpoints'}: a file is in the way; move it or "
      "choose another train.run_dir")
  assert (run_dir / "checkpoints").read_text() == "not a folder"
  (run_dir / "checkpoints").unlink()
  loop.run(cfg, run_dir, log=quiet)
  assert steps_saved(run_dir) == [3, 6]


def test_a_full_disk_at_a_save_ends_with_one_line_keeps_the_last_checkpoint_and_resumes(
    tmp_path, data_dir, monkeypatch):
  run_dir = tmp_path / "run"
  # Keeping one checkpoint: the failed save must not have removed the one before it.
  cfg = smoke_config(data_dir, "train.eval_every=100", "train.keep_checkpoints=1")
  write = checkpoint.DataShardsHandler.save

  def full_at_step_6(self, directory, args):
    if "/6." in str(directory):
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return write(self, directory, args)

  monkeypatch.setattr(checkpoint.DataShardsHandler, "save", full_at_step_6)
  with pytest.raises(checkpoint.CheckpointError) as caught:
    loop.run(cfg, run_dir, log=quiet)
  first = str(caught.value).splitlines()[0]
  assert first.startswith("the checkpoint of step 6 failed (No space left on device: ")
  assert first.endswith(f"the newest complete one is step 3, in {run_dir / 'checkpoints'}")
  # No checkpoint at step 1 whatever checkpoint_every says; step 6's partial save left aside.
  assert steps_saved(run_dir) == [3]
  monkeypatch.setattr(checkpoint.DataShardsHandler, "save", write)
  loop.run(cfg, run_dir, log=quiet)
  assert steps_saved(run_dir) == [6]  # keep_checkpoints=1, once step 6 is complete
  assert not list((run_dir / "checkpoints").glob("*orbax-checkpoint-tmp*"))  # cleaned up
  rows = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()
          if "train/loss" in line]
  assert len(rows) == 6 and sorted(logged(run_dir, "train/loss")) == [1, 2, 3, 4, 5, 6]


class _FailsLater:
  """A background write that fails after a moment, as a disk filling up would."""

  def result(self, timeout=None):
    del timeout
    time.sleep(0.5)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_background_save_failure_ends_the_run_within_steps(tmp_path, data_dir, monkeypatch):
  run_dir = tmp_path / "run"
  cfg = smoke_config(data_dir, "train.eval_every=1000", "train.steps=200")
  write = ocp.JsonCheckpointHandler.async_save

  async def fails_later(self, directory, args):
    futures = await write(self, directory, args=args)
    return [*(futures or []), _FailsLater()]

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", fails_later)
  with pytest.raises(checkpoint.CheckpointError) as caught:
    loop.run(cfg, run_dir, log=quiet)
  assert str(caught.value).splitlines()[0] == (
      "the checkpoint of step 3 failed (No space left on device); no checkpoint was completed, "
      f"in {run_dir / 'checkpoints'}")
  assert max(logged(run_dir, "train/loss")) < 100  # seconds after the failure, not at the end
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", write)
  loop.run(with_train(cfg, steps=6), run_dir, log=quiet)
  assert steps_saved(run_dir) == [3, 6]


def test_a_divergence_is_not_checkpointed_and_names_the_command_to_continue(tmp_path, data_dir):
  run_dir = tmp_path / "run"
  cfg = smoke_config(data_dir, "train.eval_every=100", "train.nan_patience=2")
  loop.run(with_train(cfg, stop_after=3), run_dir, log=quiet)
  kept = snapshot(run_dir / "checkpoints" / "3")
  # Step 4's update is finite but enormous; the steps after it are skipped.
  diverging = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e38, value_lr=1e38))
  with pytest.raises(loop.NonFiniteLoss) as caught:
    loop.run(diverging, run_dir, log=quiet)
  first = str(caught.value).splitlines()[0]
  assert first.startswith("training diverged: 2 steps in a row up to step 6 were skipped (")
  assert first.endswith("then continue from the last healthy checkpoint, step 3: the same "
                        "command with train.resume_step=3")
  assert steps_saved(run_dir) == [3]  # the final step's save was postponed, never written
  assert snapshot(run_dir / "checkpoints" / "3") == kept

  continued = with_train(cfg, resume_step=3)
  loop.run(with_train(continued, stop_after=1), run_dir, log=quiet)
  assert steps_saved(run_dir) == [3, 4]
  lines = []  # the same command again (a time-limited job) goes on, not back to step 3
  final = loop.run(continued, run_dir, log=lines.append)
  assert "train.resume_step=3: continued from it already; resuming from step 4" in lines
  assert steps_saved(run_dir) == [3, 4, 6] and np.isfinite(final["eval/loss"])
  assert all(np.isfinite(x) for x in logged(run_dir, "train/loss").values())


def test_resume_step_sets_the_newer_checkpoints_aside_and_refuses_a_missing_step(
    tmp_path, data_dir):
  run_dir = tmp_path / "run"
  cfg = smoke_config(data_dir, "train.eval_every=100", "train.checkpoint_every=2")
  loop.run(with_train(cfg, stop_after=4), run_dir, log=quiet)
  newer = snapshot(run_dir / "checkpoints" / "4")
  missing = r"holds no checkpoint of step 3 \(it holds \[2, 4\]\)"
  with pytest.raises(loop.ConfigError, match=missing):
    loop.run(with_train(cfg, resume_step=3), run_dir, log=quiet)
  lines = []
  loop.run(with_train(cfg, resume_step=2), run_dir, log=lines.append)
  assert f"moved the checkpoints of steps [4] to {run_dir / 'set_aside'} (kept, not used)" in lines
  assert snapshot(run_dir / "set_aside" / "4") == newer
  assert steps_saved(run_dir)[-1] == 6
  assert sorted(logged(run_dir, "train/loss")) == list(range(1, 7))


def _step_setup(data_dir, *overrides):
  cfg = smoke_config(data_dir, *overrides)
  state = state_lib.create_state(cfg, sharding.make_mesh(cfg.mesh))
  train_step = jax.jit(step_lib.make_train_step(
      cfg, state_lib.model_graphdef(cfg), optim.make_optimizer(cfg), lambda s: 0.0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 258, (8, 33)), jnp.int32)
  return state, train_step, tokens


def assert_unchanged(after, before):
  for a, b in zip(jax.tree.leaves((after.params, after.opt_state)),
                  jax.tree.leaves((before.params, before.opt_state))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("factor", [4.0, 0.0], ids=["guarded", "off"])
def test_a_loss_far_above_its_running_mean_is_not_applied(data_dir, factor):
  state, train_step, tokens = _step_setup(data_dir, f"train.loss_spike_factor={factor}")
  calm = state._replace(loss_mean=jnp.float32(0.5))  # the batch's loss is about 5.5
  after, metrics = train_step(calm, tokens)
  if factor:
    assert not bool(metrics["finite"]) and int(after.skipped) == 1
    assert float(after.loss_mean) == 0.5
    assert_unchanged(after, calm)
  else:
    assert bool(metrics["finite"]) and int(after.skipped) == 0
  first, metrics = train_step(state, tokens)  # no mean yet: the first loss starts it
  assert int(first.skipped) == 0 and float(first.loss_mean) == float(metrics["loss"])


def test_an_update_that_overflows_a_parameter_is_caught_by_the_next_step(data_dir):
  # Finite loss and gradients, but Adam's first step (about +-1 per parameter, plus the decay)
  # times a rate at float32's limit overflows. The step does not check its own result (that
  # would keep every parameter and moment twice); the next step's loss is not finite, and it and
  # those after it are skipped until train.nan_patience ends the run at the last healthy checkpoint.
  state, train_step, tokens = _step_setup(
      data_dir, "optim.lr=3.4e38", "optim.value_lr=3.4e38", "optim.warmup=0",
      "train.loss_spike_factor=0")
  after, metrics = train_step(state, tokens)
  assert np.isfinite(float(metrics["loss"])) and bool(metrics["finite"])
  broken, metrics = train_step(after, tokens)
  assert not bool(metrics["finite"]) and int(broken.skipped) == 1
  assert_unchanged(broken, after)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
  """A run with checkpoints at steps 3 and 6, to copy and damage."""
  run_dir = tmp_path_factory.mktemp("finished") / "run"
  loop.run(smoke_config(data_dir, "train.eval_every=100"), run_dir, log=quiet)
  return run_dir


def _damage(step_dir: pathlib.Path, case: str) -> None:
  if case == "metadata_deleted":
    (step_dir / "state" / "_METADATA").unlink()
  elif case == "array_truncated":
    biggest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
  elif case == "data_deleted":
    for p in (step_dir / "data").glob("shard_*"):
      p.unlink()
  else:
    for p in (step_dir / "data").glob("shard_*"):
      p.write_text("{not json")


@pytest.mark.parametrize(
    "case", ["metadata_deleted", "array_truncated", "data_deleted", "data_garbage"])
def test_a_damaged_newest_checkpoint_is_reported_kept_and_the_one_before_resumed(
    case, tmp_path, finished_run, data_dir):
  run_dir = tmp_path / "run"
  shutil.copytree(finished_run, run_dir)
  _damage(run_dir / "checkpoints" / "6", case)
  damaged = snapshot(run_dir / "checkpoints" / "6")
  lines = []
  cfg = smoke_config(data_dir, "train.eval_every=100", "train.steps=7")
  loop.run(cfg, run_dir, log=lines.append)
  warnings = [line for line in lines if line.startswith("warning: ")]
  assert warnings[0].startswith(
      f"warning: checkpoint {run_dir / 'checkpoints' / '6'} cannot be read ("), lines
  assert warnings[0].endswith("; trying the checkpoint before it")
  assert "data.shards" not in warnings[0] and "model" not in warnings[0]
  assert "JSONDecodeError" not in warnings[0]
  assert f"moved the checkpoints of steps [6] to {run_dir / 'set_aside'} (kept, not used)" in lines
  assert f"resumed from {run_dir / 'checkpoints' / '3'}" in lines
  assert snapshot(run_dir / "set_aside" / "6") == damaged  # kept as it was
  assert steps_saved(run_dir) == [3, 6, 7]


def test_a_resume_refuses_a_change_of_model_or_data_and_reports_the_others(
    tmp_path, finished_run, data_dir):
  run_dir = tmp_path / "run"
  shutil.copytree(finished_run, run_dir)
  before = snapshot(run_dir)
  for override, field, old, new in [
      ("model.memory.qk_norm=true", "model.memory.qk_norm", False, True),
      ("model.rope_theta=5000", "model.rope_theta", 10000.0, 5000.0),
      ("data.people=30", "data.people", 24, 30)]:
    with pytest.raises(loop.ConfigError) as caught:
      loop.run(smoke_config(data_dir, "train.eval_every=100", "train.steps=7", override), run_dir,
               log=quiet)
    assert str(caught.value).splitlines()[0] == (
        f"{field}: the checkpoint of step 6 in {run_dir} was trained with {old!r}, this config has "
        f"{new!r}, which changes the model or its data; set it back, or choose another "
        "train.run_dir")
  assert snapshot(run_dir) == before
  lines = []
  loop.run(smoke_config(data_dir, "train.eval_every=100", "train.steps=7", "train.log_every=2",
                        "model.remat=block"), run_dir, log=lines.append)
  assert ("changed since the checkpoint of step 6: model.remat 'none' -> 'block', "
          "train.log_every 1 -> 2") in lines
  assert steps_saved(run_dir)[-1] == 7


def test_a_checkpoint_from_before_the_loss_mean_resumes_with_the_mean_restarted(tmp_path, data_dir):
  cfg = smoke_config(data_dir)
  mesh = sharding.make_mesh(cfg.mesh)
  state = state_lib.create_state(cfg, mesh)
  older = {k: v for k, v in state._asdict().items() if k != "loss_mean"}  # the saved layout
  saver = checkpoint.Checkpointer(tmp_path, every=1, keep=1, async_save=False)
  saver.save(2, older, {"shard_count": 1, "shards": {}}, cfg)
  saver.close()
  reader = checkpoint.Checkpointer(tmp_path, every=1, keep=1, async_save=False)
  restored, _ = reader.restore(2, state_lib.abstract_state(cfg, mesh))
  reader.close()
  assert float(restored.loss_mean) == 0.0
  np.testing.assert_array_equal(restored.step, state.step)
