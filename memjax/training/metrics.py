"""Metrics of a run: one JSON object per line in `metrics.jsonl`, and TensorBoard event files.

Both append: a resumed run adds to the logs of the steps before it. The rows `metrics.jsonl`
holds past the resumed checkpoint are dropped first (`drop_after`): those steps run again.
TensorBoard files come from tensorboardX, which needs no TensorFlow.

In a run directory on an object store (gs://), objects cannot be appended to: `metrics.jsonl` is
kept in memory (what it held at start, then each new line) and rewritten whole, at most every
`flush_seconds` and at close, so readers keep one file and the uploads stay few; a crash loses at
most that interval of lines, which the resumed run logs again. (Files of one chunk each would
avoid rewriting, but every reader would have to stitch them.) tensorboardX does the same with
its event file on gs:// (google-cloud-storage, rewritten on each of its flushes) and s3://.

With `train.wandb.mode` online or offline, the same values go to Weights & Biases (imported only
then: the `wandb` extra); the run's id is kept in `wandb-run-id`, so a resumed run continues it.
"""

from __future__ import annotations

import json
import math
import time
from typing import Mapping

from etils import epath

from memjax import paths
from memjax.config import ConfigError, WandbConfig

# The object stores tensorboardX writes to; any other URI would become a local folder.
_TENSORBOARD_SCHEMES = ("gs://", "s3://")


def check_tensorboard_dir(run_dir: epath.PathLike) -> None:
  """Raises ConfigError for a run directory that tensorboardX cannot write to."""
  if paths.is_remote(run_dir) and not str(run_dir).startswith(_TENSORBOARD_SCHEMES):
    raise ConfigError(
        "train.tensorboard",
        f"tensorboardX writes to local, gs:// and s3:// directories, not {run_dir}; set "
        "train.tensorboard=false",
    )


def check_wandb(settings: WandbConfig) -> None:
  """Raises ConfigError when wandb logging is asked for and wandb is not installed."""
  if settings.mode == "disabled":
    return
  try:
    import wandb  # noqa: F401
  except ImportError:
    raise ConfigError(
        "train.wandb.mode",
        f"{settings.mode} needs the wandb package: pip install 'memjax[wandb]', or set "
        "train.wandb.mode=disabled",
    ) from None


def _start_wandb(run_dir: epath.Path, settings: WandbConfig, config: Mapping | None):
  import wandb

  id_file = run_dir / "wandb-run-id"
  run_id = id_file.read_text().strip() if id_file.exists() else None
  run = wandb.init(
      project=settings.project or None, entity=settings.entity or None,
      name=settings.name or run_dir.name, group=settings.group or None, mode=settings.mode,
      dir=None if paths.is_remote(run_dir) else str(run_dir),  # wandb writes local files only
      config=dict(config or {}), id=run_id, resume="allow" if run_id else None,
  )
  if run_id is None:
    id_file.write_text(run.id)
  return run


def drop_after(run_dir: epath.PathLike, step: int) -> None:
  """Drops the rows of `metrics.jsonl` past `step`: a resumed run logs those steps again.
  (TensorBoard readers keep the last value written for a step.)"""
  path = epath.Path(run_dir) / "metrics.jsonl"
  if not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)

  def kept(line: str) -> bool:
    try:
      return json.loads(line).get("step", 0) <= step
    except (ValueError, AttributeError):
      return False  # a line cut short by a kill

  rows = [line for line in lines if kept(line)]
  if len(rows) != len(lines):
    path.write_text("".join(rows))


class MetricsWriter:
  """Appends to the run's logs; a writer that is not `primary` (processes other than the first
  of a multi-process run, whose metrics are the same global values) writes nothing."""

  def __init__(
      self, run_dir: epath.PathLike, *, tensorboard: bool = True, primary: bool = True,
      flush_seconds: float = 30.0, wandb: WandbConfig | None = None,
      config: Mapping | None = None,
  ):
    run_dir = epath.Path(run_dir)
    self.path = run_dir / "metrics.jsonl"
    remote = paths.is_remote(run_dir)
    if tensorboard:
      check_tensorboard_dir(run_dir)
    self._file = None
    self._lines: list[str] | None = None  # an object store's whole file, rewritten on flush
    self._flush_seconds, self._flushed = flush_seconds, time.monotonic()
    if primary and remote:
      self._lines = [self.path.read_text()] if self.path.exists() else []
    elif primary:
      self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard and primary:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(run_dir / "tensorboard"))
    self._wandb = None  # `config` (a plain dict) is the wandb run's config
    if wandb is not None and wandb.mode != "disabled" and primary:
      check_wandb(wandb)
      self._wandb = _start_wandb(run_dir, wandb, config)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if self._file is None and self._lines is None:
      return
    values = {k: _plain(v) for k, v in metrics.items()}
    line = json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n"
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
      if time.monotonic() - self._flushed >= self._flush_seconds:
        self._rewrite()
    numbers = {k: v for k, v in values.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if self._tb is not None:
      for name, value in numbers.items():
        self._tb.add_scalar(name, value, step)
    if self._wandb is not None:
      self._wandb.log(numbers, step=step)

  def _rewrite(self) -> None:
    self.path.write_text("".join(self._lines))
    self._flushed = time.monotonic()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._lines is not None:
      self._rewrite()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def _plain(value):
  value = value.item() if hasattr(value, "item") else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf
  return value
