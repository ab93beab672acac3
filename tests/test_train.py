"""The training program: `python train.py` end to end, resuming, the step's guards, bad input."""

import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import generate, optim, sharding
from memjax.training import loop, state as state_lib, step as step_lib

from support.training import SMOKE, logged, smoke_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_train_module():
  spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_cli_trains_evaluates_saves_and_generates(tmp_path, data_dir, capsys):
  run_dir = tmp_path / "run"
  train = load_train_module()
  assert train.main([*SMOKE, f"data.data_dir={data_dir}", f"train.run_dir={run_dir}"]) == 0
  out = capsys.readouterr()
  text = out.out + out.err
  assert "compiled train step" in text and "optimizer state" in text and "temporaries" in text
  assert "eval loss" in text and "memory: layer1/coverage" in text
  assert "fact recall" in text and "(chance " in text
  summary = [line for line in text.splitlines() if line.startswith("summary: ")]
  assert len(summary) == 1 and "eval loss" in summary[0] and "fact recall" in summary[0], summary
  assert "100%" in out.err  # the progress bar
  losses = logged(run_dir, "train/loss")
  assert sorted(losses) == list(range(1, 7)) and all(0 < x < 10 for x in losses.values())
  assert set(logged(run_dir, "eval/loss")) == {3, 6}
  assert set(logged(run_dir, "eval/bits_per_byte")) == {3, 6} and "bits per byte" in text
  assert (run_dir / "checkpoints" / "6").is_dir()
  assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

  assert generate.main([str(run_dir), "--prompt", "Ada was born in", "--max-new-tokens", "6"]) == 0
  assert capsys.readouterr().out.startswith("Ada was born in")


def test_a_stopped_and_resumed_run_repeats_the_uninterrupted_one_bitwise(tmp_path, data_dir):
  cfg = smoke_config(data_dir, "train.eval_every=100")
  loop.run(cfg, tmp_path / "whole", log=lambda _: None)
  loop.run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stop_after=4)),
           tmp_path / "parts", log=lambda _: None)
  assert sorted(logged(tmp_path / "parts", "train/loss")) == [1, 2, 3, 4]
  loop.run(cfg, tmp_path / "parts", log=lambda _: None)
  assert logged(tmp_path / "parts", "train/loss") == logged(tmp_path / "whole", "train/loss")
  assert logged(tmp_path / "parts", "eval/loss") == logged(tmp_path / "whole", "eval/loss")


def test_the_step_skips_non_finite_updates_and_counts_them(data_dir):
  cfg = smoke_config(data_dir)
  tx = optim.make_optimizer(cfg)
  mesh = sharding.make_mesh(cfg.mesh)
  state = state_lib.create_state(cfg, mesh)
  graphdef = state_lib.model_graphdef(cfg)
  train_step = jax.jit(step_lib.make_train_step(cfg, graphdef, tx, lambda s: 0.0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 258, (8, 33)), jnp.int32)
  poisoned = state._replace(
      params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), state.params)
  )
  after, metrics = train_step(poisoned, tokens)
  assert not bool(metrics["finite"])
  assert (int(after.bad_steps), int(after.skipped), int(after.step)) == (1, 1, 1)
  for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(poisoned.params)):
    np.testing.assert_array_equal(a, b)
  healthy, metrics = train_step(state, tokens)
  assert bool(metrics["finite"]) and int(healthy.bad_steps) == 0


@pytest.mark.parametrize("rows", [False, True], ids=["dense_grads", "row_grads"])
def test_a_step_with_dropout_advances_the_rng_counts_and_draws_new_masks(data_dir, rows):
  cfg = smoke_config(data_dir, "model.memory.input_dropout=0.2", "model.memory.value_dropout=0.2")
  state = state_lib.create_state(cfg, sharding.make_mesh(cfg.mesh))
  step = jax.jit(step_lib.make_train_step(
      cfg, state_lib.model_graphdef(cfg), optim.make_optimizer(cfg), lambda s: 0.0, rows))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 258, (8, 33)), jnp.int32)
  draws = lambda s: sum(int(c) for c in jax.tree.leaves(s.other) if c.dtype == jnp.uint32)
  first, m1 = step(state, tokens)
  second, m2 = step(first, tokens)  # a zero learning rate: the same parameters, new masks
  assert draws(first) > draws(state)
  assert bool(m1["finite"]) and float(m1["loss"]) != float(m2["loss"])


def test_gradient_accumulation_matches_one_big_batch(data_dir):
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 258, (8, 33)), jnp.int32)
  results = []
  for accum in (1, 4):
    cfg = smoke_config(data_dir, f"train.grad_accum={accum}")
    state = state_lib.create_state(cfg, sharding.make_mesh(cfg.mesh))
    step = jax.jit(step_lib.make_train_step(cfg, state_lib.model_graphdef(cfg), optim.make_optimizer(cfg), lambda s: 0.0))
    results.append(step(state, tokens))
  (one, m1), (four, m4) = results
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_single_micro_batch_step_equals_the_accumulating_one(data_dir):
  # grad_accum=1 skips the float32 accumulation carry. Two micro-batches of the same tokens
  # average to the same gradients exactly ((g + g) / 2 = g), through the accumulating path.
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 258, (4, 33)), jnp.int32)
  results = []
  for accum, batch in ((1, tokens), (2, jnp.concatenate([tokens, tokens]))):
    cfg = smoke_config(data_dir, f"train.grad_accum={accum}", f"train.batch_size={batch.shape[0]}")
    state = state_lib.create_state(cfg, sharding.make_mesh(cfg.mesh))
    tx = optim.make_optimizer(cfg)
    step = jax.jit(step_lib.make_train_step(cfg, state_lib.model_graphdef(cfg), tx, lambda s: 0.0))
    results.append(step(state, batch))
  (one, m1), (two, m2) = results
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves((one.params, one.opt_state)), jax.tree.leaves((two.params, two.opt_state))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def snapshot(directory: pathlib.Path) -> dict:
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["missing_files", "empty_file", "bad_utf8", "unknown_key",
                                  "other_shape", "unwritable"])
def test_bad_input_gives_one_clear_error_and_overwrites_nothing(case, tmp_path, data_dir, capsys):
  train = load_train_module()
  run_dir = tmp_path / "run"
  base = [*SMOKE, f"data.data_dir={data_dir}", f"train.run_dir={run_dir}", "train.steps=3"]
  assert train.main(base) == 0  # an earlier run whose files must survive
  before = snapshot(run_dir)
  capsys.readouterr()
  other = [*SMOKE, f"data.data_dir={data_dir}", f"train.run_dir={tmp_path / 'other'}"]
  if case == "missing_files":
    args, expected = [*other, "data.source=files", f"data.path={tmp_path}/nothing/*.txt"], "nothing"
  elif case == "empty_file":
    (tmp_path / "empty.txt").write_text("")
    args, expected = [*other, "data.source=files", f"data.path={tmp_path}/empty.txt"], "empty"
  elif case == "bad_utf8":
    (tmp_path / "bad.txt").write_bytes(b"fine text \xff\xfe then not")
    args, expected = [*other, "data.source=files", f"data.path={tmp_path}/bad.txt"], "bad.txt"
  elif case == "unknown_key":
    args, expected = [*base, "train.stpes=4"], "train.stpes: unknown key"
  elif case == "other_shape":
    args, expected = [*base, "model.dim=48"], "layers.0.attention.wk.kernel"
  else:
    (tmp_path / "a_file").write_text("")
    args, expected = [*other[:-1], f"train.run_dir={tmp_path / 'a_file' / 'run'}"], "train.run_dir"
  assert train.main(args) == 2
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and expected in errors[0], err
  assert snapshot(run_dir) == before


def test_bfloat16_compute_trains(tmp_path, data_dir):
  cfg = smoke_config(data_dir, "model.dtype=bfloat16", "train.steps=3", "train.eval_every=3")
  final = loop.run(cfg, tmp_path / "bf16", log=lambda _: None)
  losses = logged(tmp_path / "bf16", "train/loss")
  assert len(losses) == 3 and all(np.isfinite(x) and 0 < x < 10 for x in losses.values())
  assert np.isfinite(final["eval/loss"]) and "recall/all" in final
