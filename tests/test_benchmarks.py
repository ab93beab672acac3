"""The benchmark scripts run end to end at smoke size and write the promised JSON keys."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from support.lookup import IMPLS

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


def run_script(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  # One CPU device, as a user runs the scripts (conftest asks this process for 8).
  flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / name), "--smoke", *args],
      capture_output=True, text=True, timeout=timeout, check=False,
      env={**os.environ, "XLA_FLAGS": flags},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_train_throughput_smoke(tmp_path):
  out = tmp_path / "throughput.json"
  proc = run_script("train_throughput.py", "--repeats", "1", "--steps", "1", "--json", str(out))
  assert "| Memory+ |" in proc.stdout
  models = json.loads(out.read_text())["models"]
  assert sorted(models) == sorted(["dense", "Memory", "Memory+", "MoE", "PEER"])
  for name, r in models.items():
    assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["flops_per_token"] > 0, name
    assert 0 < r["params_active"] <= r["params_total"], name
  assert models["dense"]["params_active"] == models["dense"]["params_total"]
  for sparse in ("Memory+", "MoE", "PEER"):
    assert models[sparse]["params_active"] < models[sparse]["params_total"], sparse


def test_scaling_smoke(tmp_path):
  out = tmp_path / "scaling.json"
  proc = run_script("scaling.py", "--repeats", "1", "--json", str(out))
  assert "| 2^10 |" in proc.stdout
  rows = json.loads(out.read_text())["rows"]
  assert [r["slots"] for r in rows] == [2**8, 2**10]
  for r in rows:
    assert min(r["step_s"], r["step_sparse_s"], r["select_s"], r["bag_fwd_bwd_s"], r["optimizer_s"]) > 0
    assert r["temp_sparse_bytes"] > 0 and not r["bf16"]
  # Parameters and both moments grow by the table's 2^10 - 2^8 rows of V = 32 and the sub-keys'
  # 4 heads x 2 halves x (32 - 16) keys of 16 dims, in float32.
  grown = (rows[1]["params_bytes"] + rows[1]["opt_state_bytes"]) - (rows[0]["params_bytes"] + rows[0]["opt_state_bytes"])
  assert grown == 3 * 4 * ((2**10 - 2**8) * 32 + 4 * 2 * (32 - 16) * 16)
  # The dense update's floor: 8 float32 passes over the table (gradient written and read; table
  # and both moments read and written), over a bandwidth measured in the same run.
  for r in rows:
    assert r["floor_bytes"] == 8 * 4 * r["slots"] * 32
    assert r["copy_GBps"] > 0 and r["floor_s"] == pytest.approx(r["floor_bytes"] / r["copy_GBps"] / 1e9)


def test_knowledge_smoke(tmp_path):
  out = tmp_path / "knowledge.json"
  proc = run_script("knowledge.py", "--out-dir", str(tmp_path), "--json", str(out))
  assert "| Memory+ d32 |" in proc.stdout
  figures = json.loads(out.read_text())
  families = {r["family"] for r in figures["rows"]}
  assert families == {"dense", "memory", "moe", "peer"}
  for r in figures["rows"]:
    assert 0 <= r["recall"] <= 1 and np.isfinite(r["eval_loss"]) and r["flops_per_token"] > 0, r
  assert figures["comparison"].startswith("Memory+ recalls")
  assert (tmp_path / "knowledge_smoke.md").read_text().startswith("knowledge corpus")
  assert (tmp_path / "knowledge_smoke.png").read_bytes()[:4] == b"\x89PNG"
  # The table and plot again from the saved rows, training nothing.
  redo = tmp_path / "redo"
  run_script("knowledge.py", "--from-json", str(out), "--out-dir", str(redo), timeout=120)
  assert (redo / "knowledge_smoke.md").read_text() == (tmp_path / "knowledge_smoke.md").read_text()


def test_table_update_smoke(tmp_path):
  out = tmp_path / "table_update.json"
  proc = run_script("table_update.py", "--json", str(out))
  assert "| 256 | dense |" in proc.stdout and "| 256 | sparse |" in proc.stdout
  rows = json.loads(out.read_text())["rows"]
  assert [r["update"] for r in rows] == ["dense", "sparse"]
  for r in rows:
    assert 0 <= r["recall"] <= 1 and np.isfinite(r["eval_loss"]), r


REFERENCE = pathlib.Path(os.environ.get("MEMJAX_REFERENCE_DIR", ROOT / ".reference" / "memory"))


@pytest.mark.skipif(
    not (REFERENCE / "lingua" / "product_key" / "memory.py").is_file(),
    reason=f"no checkout of facebookresearch/memory at {REFERENCE} (set MEMJAX_REFERENCE_DIR)",
)
def test_reference_run_smoke_agrees_with_the_reference_code_step_by_step(tmp_path):
  out = tmp_path / "reference_run.json"
  proc = run_script("reference_run.py", "--reference", str(REFERENCE), "--json", str(out))
  assert "largest relative difference" in proc.stdout
  figures = json.loads(out.read_text())
  assert [r["step"] for r in figures["rows"]] == list(range(1, 9))
  assert figures["max_rel_diff"] <= figures["tolerance"] == 1e-4
  # The losses fall: both frameworks are training, not just evaluating the same weights.
  assert figures["rows"][-1]["reference"] < figures["rows"][0]["reference"] - 0.5


def test_reference_run_refuses_a_folder_that_is_not_the_reference(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "reference_run.py"), "--reference", str(tmp_path)],
      capture_output=True, text=True, timeout=120, check=False,
  )
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path} is not a checkout")


def test_prepare_smoke(tmp_path):
  out = tmp_path / "prepare.json"
  proc = run_script("prepare.py", "--work-dir", str(tmp_path), "--json", str(out), timeout=300)
  assert "| memjax.data.prepare | 2 |" in proc.stdout and "| files, index cached |" in proc.stdout
  figures = json.loads(out.read_text())
  assert [p["processes"] for p in figures["prepare"]] == [1, 2]
  assert len({(p["documents"], p["tokens"]) for p in figures["prepare"]}) == 1
  for p in figures["prepare"]:
    assert p["MB_per_s"] > 0 and p["tokens_per_s"] > 0 and p["shards"] > 1, p
  assert [r["source"].split(",")[0].split(" ")[0] for r in figures["startup"]] == [
      "files", "files", "arrayrecord"]
  assert all(r["seconds"] > 0 and r["documents"] == p["documents"] for r in figures["startup"])
  assert not list(tmp_path.glob("prepared_*"))  # the shards are deleted unless --keep
