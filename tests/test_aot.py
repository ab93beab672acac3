"""memjax.aot: Cloud TPU names, and a real compile of the train step for a TPU topology (with
libtpu installed: the `tpu` extra): the fit, the roofline, the advice when it does not fit, the
mesh search, and meshes that split the slice's torus."""

import os
import subprocess
import sys

import pytest

from memjax import aot, config, config_loading, sharding
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
  # What the compiler allows of v5e's 16 GiB, the roofline against v5e's published peaks, and
  # the slice's tokens/s.
  assert "15.75 GiB the compiler allows of the 16.00 GiB HBM" in out
  assert "roofline (v5e: 197 TFLOP/s bf16, 819 GB/s HBM per chip" in out
  assert "step about " in out and "tokens/s for the slice: about " in out


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


def test_the_compilers_out_of_memory_messages_are_read_in_gib():
  temporaries = aot.parse_out_of_memory(
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (33.71G) exceeds available HBM (15.75G).")
  assert temporaries == {"temporaries": 33.71 * 2**30, "allowed": 15.75 * 2**30}
  used = aot.parse_out_of_memory(
      "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20.50G of 15.75G hbm. "
      "Exceeded hbm capacity by 4.75G.")
  assert used == {"used": 20.5 * 2**30, "allowed": 15.75 * 2**30}
  assert aot.parse_out_of_memory("INVALID_ARGUMENT: something else") is None


def _aot(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # a slice, not 8 CPUs
  return subprocess.run([sys.executable, "-m", "memjax.aot", *args], capture_output=True,
                        text=True, env=env, timeout=900)


@needs_libtpu
@pytest.mark.slow
def test_a_step_that_does_not_fit_says_so_and_what_would_fit():
  """tiny with a 4096^2-slot table (8 GiB of float32 values, 16 GiB of Adam moments) copied on
  every chip of a v5e-8: a short report, not the compiler's traceback; the table's columns over
  the 8 chips first among the changes."""
  done = _aot("config=tiny", "model.memory.n_keys=4096", "model.memory.impl=xla", "topology=v5e-8")
  assert done.returncode == aot.EXIT_DOES_NOT_FIT, done.stderr
  lines = done.stdout.splitlines()
  assert lines[0].startswith("does not fit: needs ") and " of 15.75 GiB per chip" in lines[0]
  assert any(line.strip().startswith("optimizer state: 16.0") for line in lines)
  assert "mesh.data=1 mesh.memory=8: the value table's columns over 8 chips" in done.stdout
  assert "optim.state_dtype=bfloat16" in done.stdout
  assert "Traceback" not in done.stdout + done.stderr
  assert "TPU_WORKER_HOSTNAMES" not in done.stderr


@needs_libtpu
@pytest.mark.slow
def test_the_search_prints_the_best_mesh_that_fits(capsys):
  """The same table on a v5e-4, fsdp kept at 1 as given: replicated or over 2 chips it does not
  fit (not even compiled), over 4 it does."""
  assert aot.main(["config=tiny", "model.memory.n_keys=4096", "model.memory.impl=xla",
                   "topology=v5e-4", "mesh.fsdp=1", "--search"]) == 0
  out = capsys.readouterr().out
  replicated = "mesh.data=4 mesh.fsdp=1 mesh.memory=1 mesh.table_rows_over_fsdp=false"
  assert f"{replicated}: does not fit" in out
  assert "(not compiled)" in out
  assert "best (the shortest roofline step, then the least memory): mesh.data=1 mesh.fsdp=1 " \
      "mesh.memory=4" in out
  assert "roofline (v5e" in out


@needs_libtpu
def test_a_mesh_off_the_torus_axes_is_placed_by_splitting_one_and_said():
  """8 is no product of a v5p-128's 4x4x4 torus axes: fsdp 8 x memory 8 splits two of them
  (jax's mesh_utils alone refuses it); the warning names the cost and the shapes that map."""
  from jax.experimental import topologies

  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:4x4x4").devices
  with pytest.warns(UserWarning, match=r"1x8x8 split a physical axis.*4x4x4"):
    mesh = sharding.make_mesh(config.MeshConfig(data=1, fsdp=8, memory=8), devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "memory": 8}
  assert sorted(mesh.devices.flat, key=lambda d: d.id) == sorted(devices, key=lambda d: d.id)
  assert sharding.split_torus_axes(mesh) == ["fsdp", "memory"]
  assert (1, 4, 16) in sharding.torus_shapes(devices)
  whole = sharding.make_mesh(config.MeshConfig(data=1, fsdp=4, memory=16), devices)
  assert sharding.split_torus_axes(whole) == []


@needs_libtpu
@pytest.mark.slow
def test_the_report_says_when_the_mesh_splits_the_torus(capsys):
  """v5e's 2x4: jax places 2 x 2 x 2 by splitting the 4; the report says so and what it costs."""
  assert aot.main(["model.memory.impl=xla", "topology=v5e-8", "mesh.data=2", "mesh.fsdp=2",
                   "mesh.memory=2"]) == 0
  out = capsys.readouterr().out
  assert "placement: mesh axes data, fsdp, memory split physical axes of the v5e:2x4 torus" in out
  assert "wrap-around" in out and "1x1x8" in out


def test_a_micro_batch_short_of_the_devices_compiles_as_a_run_there_must_set_it():
  cfg = config_loading.load("tiny", ["train.batch_size=2048", "train.grad_accum=512"])
  fitted, note = aot.fit_micro_batch(cfg, 8)
  assert fitted.train.grad_accum == 256
  assert "4 sequences per micro-batch for 8 devices" in note and "grad_accum=256" in note
  assert aot.fit_micro_batch(fitted, 8) == (fitted, "")


def test_the_search_tries_every_mesh_the_config_allows():
  meshes = aot.mesh_candidates(config_loading.load("tiny", []), 4)
  shapes = {(m["mesh.data"], m["mesh.fsdp"], m["mesh.memory"], m["mesh.table_rows_over_fsdp"])
            for m in meshes}
  assert len(shapes) == len(meshes) == 9  # 6 factorizations of 4, 3 with fsdp > 1 twice
  assert (1, 1, 4, False) in shapes and (1, 4, 1, True) in shapes and (4, 1, 1, True) not in shapes
  dense = aot.mesh_candidates(config_loading.load("tiny", ["model.memory.layers=[]"]), 4)
  assert all(m["mesh.memory"] == 1 and not m["mesh.table_rows_over_fsdp"] for m in dense)


def _figures(cfg: config.Config, temp_bytes: float) -> dict:
  """What `compile_for` reports of cfg on a v5e-4, with the temporaries given."""
  from jax.experimental import topologies

  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  mesh = sharding.make_mesh(cfg.mesh, devices)
  params, opt_state, _ = aot.state_bytes(cfg, mesh)
  return {"config": cfg, "devices": 4, "libtpu_topology": "v5e:2x2", "mesh": dict(mesh.shape),
          "params_bytes": params, "opt_state_bytes": opt_state, "temp_bytes": temp_bytes,
          "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len}


@needs_libtpu
def test_the_advice_recomputes_activations_when_the_temporaries_outweigh_the_state():
  def remats(temporaries_per_state, *overrides):
    f = _figures(config_loading.load("tiny", list(overrides)), 0)
    f["temp_bytes"] = temporaries_per_state * (f["params_bytes"] + f["opt_state_bytes"])
    return [change for change, _ in aot.advise(f) if change.startswith("model.remat")]

  assert remats(10) == ["model.remat=attention", "model.remat=block"]
  assert remats(10, "model.remat=attention") == ["model.remat=block"]
  assert remats(10, "model.remat=block") == []
  assert remats(0.5) == []  # the state dominates: recomputing would not be the lever
