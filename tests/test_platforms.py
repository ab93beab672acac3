"""memjax.platforms: with libtpu installed on a machine without a TPU, the entry points start
without libtpu's TPU-discovery noise."""

import os
import subprocess
import sys

import pytest

from memjax import platforms
from support.tpu import needs_libtpu

NOISE = "TPU_WORKER_HOSTNAMES"

pytestmark = [
    needs_libtpu,
    pytest.mark.skipif(platforms.has_tpu_chip(), reason="a TPU VM: libtpu finds its chips"),
]


def _run(*args, cwd=None):
  # As a user's shell would: no JAX_PLATFORMS (the tests' conftest sets one), no simulated CPUs.
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "TPU_WORKER_HOSTNAMES", "TPU_HOST_BOUNDS")}
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                        cwd=cwd, timeout=600)


def test_jax_alone_prints_the_noise_the_helper_removes():
  start = "import jax; print(jax.devices()[0].platform)"
  assert NOISE in _run("-c", start).stderr  # what the helper is for
  quiet = _run("-c", f"from memjax import platforms; platforms.quiet_libtpu(); {start}")
  assert NOISE not in quiet.stderr and quiet.stdout.strip() == "cpu"
  # jax imported first, as memjax.generate does: the helper sets the flag, not the environment.
  late = _run("-c", f"import jax; from memjax import platforms; platforms.quiet_libtpu(); {start}")
  assert NOISE not in late.stderr and late.stdout.strip() == "cpu"


@pytest.mark.slow
def test_train_and_generate_start_quietly(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run_dir = tmp_path / "run"
  trained = _run(
      os.path.join(root, "train.py"), "model.dim=32", "model.n_layers=2", "model.n_heads=2",
      "model.memory.layers=[1]", "model.memory.n_keys=16", "model.memory.k_dim=16",
      "train.steps=1", "train.batch_size=8", "train.seq_len=16", "train.eval_every=1000",
      "train.probes=8", "train.eval_batches=1", f"train.run_dir={run_dir}", cwd=tmp_path,
  )
  assert trained.returncode == 0, trained.stderr
  assert NOISE not in trained.stderr
  generated = _run("-m", "memjax.generate", str(run_dir), "--prompt", "a", "--max-new-tokens",
                   "2", cwd=root)
  assert generated.returncode == 0, generated.stderr
  assert NOISE not in generated.stderr
