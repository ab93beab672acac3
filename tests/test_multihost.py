"""Multi-process training: two processes x 4 CPU devices against one process with 8.

Each run is `python train.py` in subprocesses joined through `jax.distributed` on localhost
(JAX's CPU collectives), as every worker of a TPU pod would run it.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from memjax import checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent

# A small memory model, its table's columns split over all 8 devices (so the lookup's
# collectives cross processes), and two data shards (so the batches do not depend on the
# process count).
SMOKE = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.memory.layers=[1]",
    "model.memory.n_keys=16", "model.memory.knn=4", "model.memory.heads=2",
    "model.memory.k_dim=32", "model.max_seqlen=64", "data.people=24", "data.shards=2",
    "train.batch_size=16", "train.seq_len=32", "train.steps=7", "optim.warmup=2",
    "train.log_every=1", "train.eval_every=5", "train.eval_batches=1", "train.probes=8",
    "train.checkpoint_every=5", "train.tensorboard=false", "mesh.data=1", "mesh.memory=8",
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def train(run_dir, data_dir, processes: int, *overrides) -> list[str]:
  """Runs train.py in `processes` processes sharing 8 devices; returns each one's output."""
  args = [*SMOKE, f"data.data_dir={data_dir}", f"train.run_dir={run_dir}", *overrides]
  if processes > 1:
    port = _free_port()
    args += [f"distributed.coordinator=localhost:{port}", f"distributed.num_processes={processes}"]
  procs = [
      subprocess.Popen(
          [sys.executable, str(ROOT / "train.py"), *args]
          + ([f"distributed.process_id={i}"] if processes > 1 else []),
          cwd=ROOT, env=_env(8 // processes), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
          text=True,
      )
      for i in range(processes)
  ]
  outputs = []
  for proc in procs:
    out, _ = proc.communicate(timeout=300)
    outputs.append(out)
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
  return outputs


def logged(run_dir, key):
  lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def final_params(run_dir):
  _, model, _ = checkpoint.load_for_inference(run_dir)
  from flax import nnx

  return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def assert_close_to_scale(got, want, tol=1e-5):
  flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  assert flat_got.keys() == flat_want.keys()
  for path, g in flat_got.items():
    w = flat_want[path]
    scale = max(float(np.max(np.abs(w))), 1e-30)
    err = float(np.max(np.abs(np.asarray(g, np.float64) - w))) / scale
    assert err <= tol, f"{jax.tree_util.keystr(path)}: {err:.2e} of scale"


@pytest.mark.slow
def test_two_processes_train_save_and_resume_like_one(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  tmp = tmp_path_factory.mktemp("runs")
  one, two, moved = tmp / "one", tmp / "two", tmp / "moved"

  train(one, data_dir, 1)
  outputs = train(two, data_dir, 2, "train.stop_after=5")
  assert "distributed: process 0 of 2" in outputs[0]
  assert "summary:" in outputs[0] and "summary:" not in outputs[1]  # the first process reports
  saved = two / "checkpoints" / "5"
  assert sorted(p.name for p in (saved / "data").glob("shard_*")) == [
      "shard_0-of-2.json", "shard_1-of-2.json"  # each written by the process that reads it
  ]
  shutil.copytree(two, moved)
  outputs = train(two, data_dir, 2)  # both processes restore step 5 and go on
  assert "resumed from" in outputs[0]
  train(moved, data_dir, 1)  # and so does one process, reading both data shards

  want_loss, want_eval = logged(one, "train/loss"), logged(one, "eval/loss")
  assert sorted(want_loss) == list(range(1, 8)) and sorted(want_eval) == [5, 7]
  want_params = final_params(one)
  for run in (two, moved):
    got_loss = logged(run, "train/loss")
    assert sorted(got_loss) == list(range(1, 8))
    np.testing.assert_allclose([got_loss[s] for s in range(1, 8)],
                               [want_loss[s] for s in range(1, 8)], rtol=1e-5)
    got_eval = logged(run, "eval/loss")
    np.testing.assert_allclose([got_eval[5], got_eval[7]], [want_eval[5], want_eval[7]], rtol=1e-5)
    assert_close_to_scale(final_params(run), want_params)
