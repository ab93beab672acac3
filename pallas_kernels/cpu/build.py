"""Compiles `lookup.cc` against the installed jaxlib's FFI headers, once per machine.

The library is built on first use with the system C++ compiler and cached in memjax's cache
directory (`memjax.cache`: `$MEMJAX_CACHE_DIR`, else `$XDG_CACHE_HOME/memjax`, else
`~/.cache/memjax`), keyed by the source, the jaxlib version, the compiler and the CPU, so a
cached build never runs on a machine it was not built for.
`MEMJAX_CPU_KERNELS=0` turns the kernels off; without a compiler they are simply unavailable and
the pure-JAX path is used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shlex
import subprocess
import tempfile

import jax
import jaxlib

from memjax.cache import cache_dir
from pallas_kernels.impls import Unavailable

SOURCE = pathlib.Path(__file__).with_name("lookup.cc")
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")


class BuildError(Unavailable):
  """The CPU kernels could not be built or loaded; the message says why."""


def _cpu_signature() -> str:
  """What -march=native depends on: the CPU model and its feature flags."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    wanted = [l for l in lines if l.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(wanted)))
  except OSError:
    return platform.processor() or platform.machine()


def _compiler() -> list[str]:
  return shlex.split(os.environ.get("CXX", "c++"))


def _library_path() -> pathlib.Path:
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), " ".join(FLAGS).encode(),
               " ".join(_compiler()).encode(), _cpu_signature().encode()):
    key.update(part)
    key.update(b"\0")
  return cache_dir() / f"lookup-{key.hexdigest()[:16]}.so"


def _compile(target: pathlib.Path) -> None:
  target.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: concurrent builders (test workers) never see half a file.
  fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  command = [*_compiler(), *FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", partial]
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
  except (OSError, subprocess.TimeoutExpired) as error:
    os.unlink(partial)
    raise BuildError(f"could not run the C++ compiler ({shlex.join(command[:1])}): {error}")
  if result.returncode != 0:
    os.unlink(partial)
    raise BuildError(f"{shlex.join(command)} failed:\n{result.stderr[-2000:]}")
  os.replace(partial, target)


@functools.cache
def load() -> ctypes.CDLL:
  """The compiled library, built now if no cached build fits. Raises BuildError."""
  if os.environ.get("MEMJAX_CPU_KERNELS", "1") == "0":
    raise BuildError("turned off by MEMJAX_CPU_KERNELS=0", deliberate=True)
  path = _library_path()
  if not path.exists():
    _compile(path)
  try:
    return ctypes.cdll.LoadLibrary(str(path))
  except OSError as error:
    raise BuildError(f"could not load {path}: {error}")
