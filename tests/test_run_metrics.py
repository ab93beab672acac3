"""What a run owner watches: step time, tokens/s, MFU, both learning rates, device memory, bits
per byte (metrics.jsonl, TensorBoard, wandb), the run's config.yaml, a profiler trace, the
compilation cache, and the line a resume with another schedule prints."""

import json
import pathlib
import shutil
import struct
import sys
import types

import jax
import pytest

from memjax import cache, config_loading, hardware
from memjax.config import ConfigError, WandbConfig
from memjax.training import loop, monitor
from memjax.training.metrics import MetricsWriter, check_wandb
from support.training import logged, smoke_config


@pytest.fixture(scope="module")
def watched(data_dir, tmp_path_factory):
  """A 6-step smoke run with a profile of steps 2 and 3 and its own compilation cache: (run dir,
  config, its log lines, the cache directory)."""
  root = tmp_path_factory.mktemp("watched")
  cfg = smoke_config(data_dir, "train.profile=2:4", f"train.compilation_cache={root / 'jax'}")
  # The smoke step compiles in less than JAX's threshold for caching a program (1 s).
  previous = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  lines = []
  try:
    loop.run(cfg, root / "run", log=lines.append)
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
  return root / "run", cfg, lines, root / "jax"


def test_a_tiny_runs_metrics_have_step_time_tokens_per_second_both_learning_rates_and_bits_per_byte(
    watched):
  run_dir, cfg, _, _ = watched
  step_time = logged(run_dir, "train/step_time_s")
  # Step 1 is never timed (one-time costs), nor a window the profiler's stop or an eval ended.
  assert 1 not in step_time and {2, 5}.issubset(step_time)
  assert all(0 < s < 60 for s in step_time.values())
  tokens = cfg.train.batch_size * cfg.train.seq_len
  for step, rate in logged(run_dir, "train/tokens_per_s").items():
    assert rate == pytest.approx(tokens / step_time[step])
  assert logged(run_dir, "train/lr")[3] == pytest.approx(cfg.optim.lr)  # warmup ends at step 2
  assert logged(run_dir, "train/lr_values")[3] == pytest.approx(cfg.optim.value_lr)
  assert logged(run_dir, "train/lr_values")[5] < cfg.optim.value_lr  # decaying
  assert set(logged(run_dir, "eval/bits_per_byte")) == {3, 6}
  # The CPU has no bf16 peak in the table and keeps no allocator statistics.
  assert not logged(run_dir, "train/mfu") and not logged(run_dir, "memory/bytes_in_use")


def _tensorboard_scalars(directory: pathlib.Path) -> dict[str, dict[int, float]]:
  """tag -> step -> value, read from the TFRecord framing of tensorboardX's event files."""
  from tensorboardX.proto import event_pb2

  scalars = {}
  for path in directory.glob("events.out.tfevents.*"):
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4  # length, its CRC, the record, its CRC
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_tensorboard_gets_the_step_time_the_learning_rates_and_the_evals_bits_per_byte(watched):
  run_dir = watched[0]
  scalars = _tensorboard_scalars(run_dir / "tensorboard")
  for tag in ("train/step_time_s", "train/tokens_per_s", "train/lr", "train/lr_values"):
    assert scalars[tag], tag
  assert scalars["eval/bits_per_byte"][6] == pytest.approx(logged(run_dir, "eval/bits_per_byte")[6])


def test_the_run_directory_holds_the_config_and_it_loads_back_to_the_same(watched):
  run_dir, cfg, _, _ = watched
  assert config_loading.load(str(run_dir / "config.yaml")) == cfg


def test_a_profile_of_two_steps_leaves_a_trace_in_the_run_directory(watched):
  run_dir, _, lines, _ = watched
  assert list((run_dir / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert any(line.startswith("profile of steps 2 to 3") for line in lines)


def test_the_compilation_cache_directory_gets_entries(watched):
  assert any(watched[3].iterdir())


def test_a_resume_with_more_steps_says_how_the_schedule_changed_before_its_first_step(
    watched, tmp_path):
  run_dir, cfg, _, _ = watched
  shutil.copytree(run_dir, tmp_path / "run")
  longer = smoke_config(cfg.data.data_dir, "train.steps=12", "train.stop_after=1")
  lines = []
  loop.run(longer, tmp_path / "run", log=lines.append)
  [line] = [line for line in lines if line.startswith("schedule changed")]
  assert "train.steps 6 -> 12" in line and "lr at step 7" in line
  assert lines.index(line) < min(i for i, s in enumerate(lines) if s.startswith("summary"))
  before, after = line.split("lr at step 7: ")[1].split(" (value table")[0].split(" -> ")
  assert float(after) > float(before)  # stretched: the decay restarts from higher up


def test_the_real_wandb_takes_the_runs_metrics_offline(watched, tmp_path, monkeypatch):
  wandb = pytest.importorskip("wandb")
  keys = set()
  real_log = wandb.sdk.wandb_run.Run.log

  def log(self, data, *args, **kwargs):  # what the run's records hold, without decoding them
    keys.update(data)
    return real_log(self, data, *args, **kwargs)

  monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
  run_dir, cfg, _, _ = watched
  shutil.copytree(run_dir, tmp_path / "run")
  more = smoke_config(cfg.data.data_dir, "train.steps=8", "train.wandb.mode=offline",
                      "train.wandb.project=memjax-test")
  loop.run(more, tmp_path / "run", log=lambda _: None)  # step 7 untimed, step 8 timed
  run_id = (tmp_path / "run" / "wandb-run-id").read_text()
  assert list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
  assert {"train/step_time_s", "train/lr_values", "eval/bits_per_byte"} <= keys


# ----------------------------------------------------------------------------------------------
# Without a run.


@pytest.mark.parametrize("kind,tflops", [
    ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5", 459), ("TPU v5p", 459),
    ("TPU v6 lite", 918), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312),
])
def test_the_peak_table_finds_a_device_kind_by_its_longest_entry(kind, tflops):
  assert hardware.peak(kind).flops == tflops * 1e12


def test_mfu_is_the_compiled_flops_per_second_over_the_kinds_peak_and_absent_on_cpu():
  class Compiled:  # what cost_analysis gives: one dict per program (a list in older JAX)
    def cost_analysis(self):
      return [{"flops": 2.5e13}]

  flops = hardware.compiled_flops(Compiled(), loop_trips=2)  # the body of a 2-trip loop
  assert flops == 5e13
  speed = loop._speed(0.5, 4096, flops, "TPU v5 lite")
  assert speed["train/mfu"] == pytest.approx(5e13 / 0.5 / 197e12)
  assert speed["train/tokens_per_s"] == 8192 and speed["train/step_time_s"] == 0.5
  assert "train/mfu" not in loop._speed(0.5, 4096, flops, "cpu")
  assert loop._speed(None, 4096, flops, "TPU v5 lite") == {}  # an untimed window


def test_device_memory_is_the_most_in_use_of_the_devices_and_absent_without_statistics():
  def device(stats):
    return types.SimpleNamespace(memory_stats=lambda: stats)

  two = [device({"bytes_in_use": 5, "peak_bytes_in_use": 9, "bytes_limit": 16}),
         device({"bytes_in_use": 7, "peak_bytes_in_use": 8, "bytes_limit": 16})]
  assert hardware.memory_in_use(two) == {"bytes_in_use": 7, "peak_bytes_in_use": 9}
  assert hardware.memory_in_use([device(None)]) is None
  assert hardware.memory_in_use(jax.local_devices()) is None  # the CPU


def test_the_step_clock_reads_nothing_before_a_timed_step():
  clock = monitor.StepClock()
  clock.tick()
  assert clock.read() is None  # never restarted: the first step
  clock.tick()
  assert clock.read() > 0


@pytest.mark.parametrize("value", ["4:2", "0:3", "x", "3"])
def test_a_bad_profile_range_is_a_config_error_naming_the_field(value):
  with pytest.raises(ConfigError, match="START:STOP|string") as error:
    config_loading.load("tiny", [f"train.profile={value}"])
  assert error.value.field == "train.profile"


def test_a_profile_after_the_last_step_is_a_config_error():
  with pytest.raises(ConfigError, match="after the last step") as error:
    config_loading.load("tiny", ["train.steps=10", "train.profile=20:22"])
  assert error.value.field == "train.profile"


def test_the_compilation_cache_is_on_by_default_under_memjaxs_cache_and_can_be_turned_off(
    monkeypatch, tmp_path):
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv("MEMJAX_CACHE_DIR", str(tmp_path))
  assert config_loading.load("tiny").train.compilation_cache == "auto"
  assert cache.compilation_cache_dir("auto") == str(tmp_path / "jax")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
  assert cache.compilation_cache_dir("auto") == "/elsewhere"
  assert cache.compilation_cache_dir("off") is None
  assert cache.compilation_cache_dir("gs://b/cache") == "gs://b/cache"


def test_wandb_without_the_package_is_a_config_error_naming_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
  with pytest.raises(ConfigError, match=r"memjax\[wandb\]") as error:
    check_wandb(WandbConfig(mode="offline"))
  assert error.value.field == "train.wandb.mode"
  check_wandb(WandbConfig())  # disabled: nothing to import


def test_the_writer_sends_wandb_the_logged_numbers_and_keeps_the_run_id_for_a_resume(
    monkeypatch, tmp_path):
  # A stand-in for wandb, so this runs where the `wandb` extra is not installed (CI); the test
  # above drives the real package when it is.
  calls = []

  class Run:
    id = "abc123"

    def log(self, values, step):
      calls.append(("log", step, values))

    def finish(self):
      calls.append(("finish",))

  def init(**kwargs):
    calls.append(("init", kwargs))
    return Run()

  monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
  settings = WandbConfig(mode="offline", project="p")
  for _ in range(2):  # a run, then its resume
    writer = MetricsWriter(tmp_path, tensorboard=False, wandb=settings, config={"seed": 0})
    writer.write(3, {"train/loss": 1.5, "train/skipped_steps": 0, "note": "text"})
    writer.close()
  first, second = [c[1] for c in calls if c[0] == "init"]
  assert first["mode"] == "offline" and first["project"] == "p" and first["config"] == {"seed": 0}
  assert first["name"] == tmp_path.name and first["id"] is None
  assert second["id"] == "abc123" and second["resume"] == "allow"
  assert ("log", 3, {"train/loss": 1.5, "train/skipped_steps": 0}) in calls
  assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["note"] == "text"
