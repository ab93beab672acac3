"""Metrics of a run: one JSON object per line in `metrics.jsonl`, and TensorBoard event files.

Both append: a resumed run adds to the logs of the steps before it and never rewrites them.
TensorBoard files come from tensorboardX, which needs no TensorFlow.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Mapping


class MetricsWriter:
  """Appends to the run's logs; a writer that is not `primary` (processes other than the first
  of a multi-process run, whose metrics are the same global values) writes nothing."""

  def __init__(self, run_dir: pathlib.Path, *, tensorboard: bool = True, primary: bool = True):
    self.path = run_dir / "metrics.jsonl"
    self._file = open(self.path, "a", encoding="utf-8") if primary else None
    self._tb = None
    if tensorboard and primary:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(run_dir / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if self._file is None:
      return
    values = {k: _plain(v) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(name, value, step)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _plain(value):
  value = value.item() if hasattr(value, "item") else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf
  return value
