"""Where memjax keeps what it builds once per machine (compiled CPU kernels, the knowledge corpus,
JAX's persistent compilation cache).

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


def compilation_cache_dir(setting: str) -> str | None:
  """The directory of JAX's persistent compilation cache for `train.compilation_cache`: "auto"
  is $JAX_COMPILATION_CACHE_DIR when set, else `cache_dir("jax")`; "off" is None."""
  if setting == "off":
    return None
  if setting == "auto":
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_dir("jax"))
  return setting


def use_compilation_cache(setting: str) -> str | None:
  """Points JAX's persistent compilation cache at `compilation_cache_dir(setting)` (before the
  process's compiles, or it starts over with the new directory); returns the directory.

  Entries are programs that took at least `jax_persistent_cache_min_compile_time_secs` (1 s) to
  compile: a restarted or resumed run skips its step's compile."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  directory = compilation_cache_dir(setting)
  if jax.config.jax_compilation_cache_dir != directory:
    compilation_cache.set_cache_dir(directory)
    compilation_cache.reset_cache()  # a cache opened on another directory keeps it otherwise
  return directory
