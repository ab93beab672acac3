"""The one error handler of memjax's command lines (`train.py`, `memjax.generate`, `memjax.eval`,
`memjax.aot`, `memjax.data.prepare`).

An error a user can fix (a config value, a file, a checkpoint that does not fit) prints one
`error: ...` line on stderr and exits EXIT_USER_ERROR; anything else is a bug in memjax: its
traceback, then a line that says so and where to report it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import traceback
from typing import Callable

EXIT_USER_ERROR = 2  # argparse's status for a bad command line
EXIT_BUG = 1

# The errors memjax raises for what a user can fix, by module. They are looked up among the
# modules already imported: an error class whose module was never loaded cannot have been raised,
# and importing them here would load orbax and TFDS (seconds) into every command.
_KNOWN_ERRORS = {
    "memjax.config": ("ConfigError",),
    "memjax.cli": ("InputError",),
    "memjax.data.sources": ("DataError",),
    "memjax.checkpoint": ("CheckpointError", "CheckpointMismatch"),
    "memjax.interop.torch_checkpoint": ("CheckpointError",),
    "memjax.training.loop": ("NonFiniteLoss",),
}
# A path that is missing, or a file where a folder should be (or the reverse), or unreadable:
# the message names the path.
_PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class InputError(ValueError):
  """A command's input that cannot be used (a path, a file, an argument): the message names it."""


def known_error_types() -> tuple[type[BaseException], ...]:
  """The classes of `_KNOWN_ERRORS` whose modules are imported, and the path errors."""
  types = list(_PATH_ERRORS)
  for module, names in _KNOWN_ERRORS.items():
    if (loaded := sys.modules.get(module)) is not None:
      types += [getattr(loaded, name) for name in names]
  return tuple(types)


def is_user_error(error: BaseException) -> bool:
  return isinstance(error, known_error_types())


def message(error: BaseException) -> str:
  """What `error: ` is followed by: an OSError as `path: reason`, others their own message."""
  if isinstance(error, OSError) and error.filename is not None and error.strerror:
    return f"{error.filename}: {error.strerror}"
  return str(error).strip() or type(error).__name__


@contextlib.contextmanager
def reading(what: str):
  """Turns an unknown error raised inside into an InputError `cannot read {what} (...)`: for
  libraries (orbax, torch) that read a user's file and raise whatever their parser meets."""
  try:
    yield
  except Exception as error:
    if is_user_error(error):
      raise
    reason = message(error).splitlines()[0]
    raise InputError(f"cannot read {what} ({type(error).__name__}: {reason})") from error


def entry_point(main: Callable[..., int | None]) -> Callable[..., int]:
  """Wraps a command's `main`: its status (None is 0), or the status of the error it raised."""

  @functools.wraps(main)
  def run(*args, **kwargs) -> int:
    try:
      return main(*args, **kwargs) or 0
    except Exception as error:  # noqa: BLE001 - every error ends here, as a line or a bug report
      if is_user_error(error):
        print(f"error: {message(error)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
      traceback.print_exc()
      print(
          f"\nThis is a bug in memjax ({type(error).__name__}), not in your input: please report "
          "it on memjax's GitHub issue tracker with the command and the traceback above.",
          file=sys.stderr, flush=True,
      )
      return EXIT_BUG

  return run
