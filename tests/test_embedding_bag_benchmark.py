"""benchmarks/embedding_bag.py runs at a toy size, times every impl here and writes its JSON."""

import importlib.util
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

import embedding_bag as bench  # noqa: E402
from pallas_kernels import impls  # noqa: E402

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None


def test_benchmark_smoke(tmp_path, capsys):
  out = tmp_path / "bag.json"
  tpu = ["--tpu-cost", "v5e:2x2"] if HAVE_LIBTPU else []
  assert bench.main(["--slots", "512", "--dim", "128", "--tokens", "64", "--bag", "16",
                     "--repeats", "1", *tpu, "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert "xla" in result["impls"]
  # On CPU: only the twin and the CPU kernels are timed, never another platform's interpreter.
  timed = {name for name in result["impls"] if "AOT" not in name and name != "torch"}
  assert timed <= {impl.name for impl in impls.IMPLS if impl.platform in (None, "cpu")}
  floor = result["floor_bytes"]
  # The forward must read 64 x 16 rows of 128 float32s; the backward adds the dense gradient.
  assert floor["forward"] >= 64 * 16 * 128 * 4
  assert floor["backward"] >= floor["forward"] + 512 * 128 * 4
  for name, row in result["impls"].items():
    if "AOT" not in name:
      assert row["forward_s"] > 0 and row["backward_s"] > 0
  assert result["impls"]["xla"]["forward_compiled_bytes"] > 0
  if HAVE_LIBTPU:  # the kernels' cost estimates reach XLA's cost analysis
    compiled = result["impls"]["pallas_tpu (v5e:2x2 AOT)"]["forward_compiled_bytes"]
    assert compiled >= floor["forward"]
  assert "| xla |" in capsys.readouterr().out
