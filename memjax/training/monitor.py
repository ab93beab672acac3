"""What a run owner watches besides the loss: the step's wall time, and a profiler trace.

Steps are dispatched asynchronously, so a wall-clock window is only meaningful between points
where the host waited for the device: the log (it fetches the window's metrics), an eval, a
checkpoint save (both read the state), the profiler's stop. The loop restarts the clock at each
of those that is not a log, and after the first step of each start, which pays one-time costs
(the data pipeline's start, the first buffers; the step itself is compiled ahead of time, so no
compile falls in any window).
"""

from __future__ import annotations

import time
from typing import Callable

import jax
from etils import epath


class StepClock:
  """Wall seconds per step over the steps `tick`ed since the last `restart` (or `read`)."""

  def __init__(self):
    self._start: float | None = None
    self._steps = 0

  def restart(self) -> None:
    self._start, self._steps = time.perf_counter(), 0

  def tick(self) -> None:
    self._steps += 1

  def read(self) -> float | None:
    """Seconds per step of the window, then a new window; None before any step was timed."""
    if self._start is None or not self._steps:
      self.restart()
      return None
    seconds = (time.perf_counter() - self._start) / self._steps
    self.restart()
    return seconds


class Profiler:
  """A JAX profiler trace of steps START <= step < STOP (`train.profile`) in `directory`
  (`<directory>/plugins/profile/<time>/`: xprof or TensorBoard's profile tab reads it)."""

  def __init__(self, steps: tuple[int, int] | None, directory: epath.Path,
               log: Callable[[str], None] = print):
    self.steps, self.directory, self._log = steps, directory, log
    self._active = self._done = False

  def before(self, step: int) -> None:
    if self.steps and not (self._active or self._done) and self.steps[0] <= step < self.steps[1]:
      jax.profiler.start_trace(str(self.directory))
      self._active, self._first = True, step

  def after(self, step: int, state) -> bool:
    """Ends the trace after its last step (waiting for the device's work); returns whether it
    did, as the step clock must then restart."""
    if not self._active or step < self.steps[1] - 1:
      return False
    jax.block_until_ready(state)
    self.stop()
    self._log(f"profile of steps {self._first} to {step} in {self.directory}")
    return True

  def stop(self) -> None:
    if self._active:
      jax.profiler.stop_trace()
      self._active, self._done = False, True
