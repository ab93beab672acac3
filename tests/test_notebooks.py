"""The Colab notebooks (notebooks/): stored without outputs and in step with their jupytext
scripts, and each runs top to bottom on the CPU in its smoke mode and draws its plots."""

import os
import pathlib
import re
import time

import jupytext
import nbclient
import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
# Each notebook and the plots (image/png outputs) it draws.
PLOTS = {"01_quickstart": 3, "02_pytorch_parity": 1, "03_scaling_on_tpu": 1}
# What a notebook needs beyond the test extra: the PyTorch oracle, the TPU compiler.
NEEDS = {"02_pytorch_parity": "torch", "03_scaling_on_tpu": "libtpu"}


def code_cells(nb):
  return [cell for cell in nb.cells if cell.cell_type == "code"]


def test_every_notebook_is_listed_and_paired():
  assert {p.stem for p in NOTEBOOKS.glob("*.ipynb")} == set(PLOTS)
  assert {p.stem for p in NOTEBOOKS.glob("*.py")} == set(PLOTS)


@pytest.mark.parametrize("name", PLOTS)
def test_stored_without_outputs(name):
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  nbformat.validate(nb)
  for cell in code_cells(nb):
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.parametrize("name", PLOTS)
def test_notebook_matches_its_script(name):
  """What `jupytext --sync` keeps equal: the cells, and the pairing itself."""
  stored = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  script = jupytext.read(NOTEBOOKS / f"{name}.py")
  assert [(c.cell_type, c.source) for c in stored.cells] == [
      (c.cell_type, c.source) for c in script.cells
  ], f"run `jupytext --sync notebooks/{name}.py`"
  for nb in (stored, script):
    assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent"


@pytest.mark.parametrize("name", PLOTS)
def test_opens_in_colab_and_installs_there(name):
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  first = nb.cells[0].source
  repo = re.search(r'^REPO = "([\w.-]+/[\w.-]+)"', code_cells(nb)[0].source, re.M)
  assert repo, "the first code cell names the GitHub repository"
  badge = f"https://colab.research.google.com/github/{repo[1]}/blob/main/notebooks/{name}.ipynb"
  assert badge in first
  assert "google.colab" in code_cells(nb)[0].source


@pytest.mark.slow
@pytest.mark.parametrize("name", PLOTS)
def test_runs_top_to_bottom_in_smoke_mode(name, tmp_path):
  if name in NEEDS:
    pytest.importorskip(NEEDS[name])
  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  env = dict(os.environ, MEMJAX_NOTEBOOK_SMOKE="1", MEMJAX_RUNS=str(tmp_path / "runs"))
  # As on a plain CPU runtime: one device unless a notebook asks for more (03 asks for 8).
  env["XLA_FLAGS"] = re.sub(
      r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")
  ).strip()
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
  )
  start = time.perf_counter()
  client.execute(env=env)  # raises CellExecutionError, with the cell's traceback, on an error
  print(f"{name}: {time.perf_counter() - start:.0f}s")
  outputs = [out for cell in code_cells(nb) for out in cell.outputs]
  assert not [out for out in outputs if out.output_type == "error"]
  plots = [out for out in outputs if "image/png" in out.get("data", {})]
  assert len(plots) == PLOTS[name], f"{len(plots)} plots drawn, expected {PLOTS[name]}"
