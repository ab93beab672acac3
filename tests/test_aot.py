"""memjax.aot: Cloud TPU names, and a real compile of the train step for a TPU topology (with
libtpu installed: the `tpu` extra)."""

import pytest

from memjax import aot, config, config_loading
from memjax.ops import auto_impl
from memjax.training import state as state_lib
from support.tpu import needs_libtpu


@pytest.mark.parametrize("name,libtpu_name,chips", [
    ("v5p-8", "v5p:2x2x1", 4), ("v5p-32", "v5p:2x2x4", 16), ("v5p-64", "v5p:2x4x4", 32),
    ("v5e-8", "v5e:2x4", 8), ("v5litepod-16", "v5e:4x4", 16), ("v6e-8", "v6e:2x4", 8),
    ("v4-8", "v4:2x2x1", 4),
])
def test_cloud_tpu_names(name, libtpu_name, chips):
  got_name, _, got_chips = aot.parse_topology(name)
  assert (got_name, got_chips) == (libtpu_name, chips)


@pytest.mark.parametrize("name", ["v5p-7", "v3-8", "v5e", "tpu-8", "v5e-12"])
def test_bad_names_fail_clearly(name):
  with pytest.raises(config.ConfigError, match="topology"):
    aot.parse_topology(name)


@needs_libtpu
def test_compiles_the_tiny_train_step_for_a_v5e_slice(capsys):
  cfg = config_loading.load("tiny", ["model.memory.impl=xla", "mesh.memory=4", "mesh.data=-1"])
  figures = aot.compile_for(cfg, "v5e-4")
  assert figures["devices"] == 4 and "v5" in figures["device_kind"].lower()
  assert figures["mesh"] == {"data": 1, "fsdp": 1, "memory": 4}
  assert figures["fits"] and figures["flops"] > 0 and figures["temp_bytes"] > 0
  # Dense parameters replicated, a quarter of the 4096 x 128 float32 table's columns per device.
  whole = state_lib.tree_bytes_per_device(state_lib.abstract_state(cfg).params)
  table = 4096 * 128 * 4
  assert figures["params_bytes"] == whole - table + table // 4
  assert aot.main(["topology=v5e-4", "model.memory.layers=[1]", "mesh.memory=4"]) == 0
  out = capsys.readouterr().out
  assert "v5e-4 (v5e:2x2" in out and "fits" in out and "FLOPs" in out
  assert "lookup impl pallas_tpu" in out  # auto: what a TPU run picks


def test_cli_errors_name_the_field(capsys):
  assert aot.main(["config=tiny"]) == 2
  assert "topology" in capsys.readouterr().err
  assert aot.main(["topology=v9-8"]) == 2
  assert "Cloud TPU name" in capsys.readouterr().err


@needs_libtpu
@pytest.mark.slow
def test_the_373m_memory_model_fits_a_v5p_8_slice():
  """The paper's 373M Memory+ model (a 1024^2 x 1024 bfloat16 table) on one small slice, the
  table's columns split over its 4 chips, with the lookup a TPU run uses (the Pallas kernels),
  at a small batch (16 x 128 tokens in one step). One slice and batch only: each compile takes
  minutes here (docs/results.md has the config's whole recipe batch, v5e-8 and more)."""
  cfg = config_loading.load("pkplus_373m_1024k", [
      "mesh.memory=4", "train.batch_size=16", "train.seq_len=128", "train.grad_accum=1"])
  figures = aot.compile_for(cfg, "v5p-8")
  print(aot.report(figures))
  assert figures["impl"] == auto_impl("tpu")
  assert figures["fits"], aot.report(figures)
  table = 1024**2 * 1024 * 2  # bfloat16
  assert figures["params_bytes"] < table  # the table is split, not replicated
