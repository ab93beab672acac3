"""The benchmark scripts run end to end at smoke size and write the promised JSON keys."""

import json
import pathlib
import subprocess
import sys

import pytest

from lookup_impls import IMPLS

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("impl", IMPLS)
def test_memory_layer_benchmark_smoke(tmp_path, impl):
  out = tmp_path / "memory_layer.json"
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "memory_layer.py"), "--smoke", "--parts",
       "--repeats", "1", "--impl", impl, "--json", str(out)],
      capture_output=True, text=True, timeout=300, check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "| fwd+bwd |" in proc.stdout
  figures = json.loads(out.read_text())
  for key in ("memjax_fwd_s", "memjax_fwd_bwd_s", "torch_fwd_s", "torch_fwd_bwd_s",
              "speedup_fwd_bwd"):
    assert figures[key] > 0, key
  assert figures["impl"] == impl
