"""Test-wide setup: JAX on 8 virtual CPU devices (for sharding tests), plus precision helpers.

The environment must be set before JAX is first imported, which a top-level conftest guarantees.
JAX_PLATFORMS is only defaulted, so a device run can still ask for its accelerator. Training runs
keep JAX's persistent compilation cache in a folder of this session (subprocesses inherit it),
not in the user's cache.
"""

import atexit
import contextlib
import os
import shutil
import tempfile

_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="memjax-tests-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402


@contextlib.contextmanager
def precision(dtype: str):
  """Enables 64-bit types for "float64" (modules must be built and run inside); restores after."""
  with jax.enable_x64(dtype == "float64"):
    yield


@contextlib.contextmanager
def _most_optimizations_off():
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture
def fast_compile():
  """Most XLA optimisations off: small test programs compile ~2.5x faster on CPU, same maths."""
  with _most_optimizations_off():
    yield


@pytest.fixture(scope="module")
def fast_compile_module():
  """`fast_compile` for a whole module, its module-scoped fixtures included (they ask for it)."""
  with _most_optimizations_off():
    yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A module's TFDS data_dir: the knowledge corpora its tests build are shared by its tests."""
  return tmp_path_factory.mktemp("tfds")
