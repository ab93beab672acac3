"""A small memory model and corpus for training-program tests, and reading a run's metrics.

With the `data_dir` fixture (tests/conftest.py), every run of it takes seconds.
"""

import json
import pathlib

from memjax import config, config_loading

# A small memory model and a 24-person corpus.
SMOKE = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.memory.layers=[1]",
    "model.memory.n_keys=16", "model.memory.knn=4", "model.memory.heads=2",
    "model.memory.k_dim=32", "model.max_seqlen=64", "data.people=24", "train.batch_size=8",
    "train.seq_len=32", "train.steps=6", "optim.warmup=2", "train.log_every=1",
    "train.eval_every=3", "train.eval_batches=1", "train.probes=12", "train.checkpoint_every=3",
]


def smoke_config(data_dir, *overrides) -> config.Config:
  """`configs/tiny` at smoke size, its knowledge corpus built under `data_dir`."""
  return config_loading.load("tiny", [*SMOKE, f"data.data_dir={data_dir}", *overrides])


def logged(run_dir, key: str) -> dict[int, float]:
  """step -> value of `key` in the run's metrics.jsonl, for the steps that logged it."""
  lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}
