"""`python train.py` end to end at smoke size."""

import importlib.util
import pathlib

import pytest

from memjax import config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_train_module():
  spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_trains_a_few_steps_and_reports_loss(capsys):
  train = load_train_module()
  train.main([
      "train.steps=4", "train.warmup=1", "train.log_every=2", "train.batch_size=2",
      "train.seq_len=32", "model.n_layers=2", "model.memory.layers=[1]",
  ])
  out = capsys.readouterr().out
  losses = [float(line.split("loss ")[1].split()[0]) for line in out.splitlines() if "loss " in line]
  assert len(losses) == 2 and all(0 < x < 10 for x in losses)


def test_bad_override_names_the_field():
  train = load_train_module()
  with pytest.raises(config.ConfigError, match="model.memory.knn"):
    train.main(["model.memory.knn=1000"])
