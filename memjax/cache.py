"""Where memjax keeps what it builds once per machine (compiled CPU kernels, the knowledge corpus).

`MEMJAX_CACHE_DIR` when set, else `$XDG_CACHE_HOME/memjax`, else `~/.cache/memjax`; an empty
variable counts as unset, as the XDG spec asks. Imports nothing from memjax, so that
`pallas_kernels` can use it too.
"""

from __future__ import annotations

import os
import pathlib


def cache_dir(*parts: str) -> pathlib.Path:
  """The cache directory, or `parts` joined under it; nothing is created."""
  if os.environ.get("MEMJAX_CACHE_DIR"):
    return pathlib.Path(os.environ["MEMJAX_CACHE_DIR"], *parts)
  xdg = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(xdg, "memjax", *parts)
