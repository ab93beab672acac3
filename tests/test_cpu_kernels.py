"""pallas_kernels.cpu beyond the lookup contract (test_lookup_contract.py runs the rest): the
build's cache key, how a failed or turned-off build falls back, the forward's two paths, and
the kernels' own argument checks."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.ops import embedding_bag, set_rows, unavailable_reason
from pallas_kernels import cpu
from pallas_kernels.cpu import build

_REASON = unavailable_reason("cpu")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"CPU kernels unavailable: {_REASON}")


def test_the_cache_key_follows_source_flags_and_compiler(monkeypatch, tmp_path):
  monkeypatch.setenv("MEMJAX_CACHE_DIR", str(tmp_path))
  path = build._library_path()
  assert path.parent == tmp_path and path.suffix == ".so"
  monkeypatch.setenv("CXX", "g++ -DSOMETHING")
  assert build._library_path() != path


def run_python(code: str, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)],
      env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
      capture_output=True, text=True, timeout=120,
  )


CHECK_FALLBACK = """
    import jax.numpy as jnp
    from memjax.ops import embedding_bag, resolve_impl, unavailable_reason
    print("reason:", unavailable_reason("cpu"))
    print("auto:", resolve_impl("auto"))
    try:
      embedding_bag(jnp.ones((4, 2)), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1)), impl="cpu")
    except ValueError as error:
      print("error:", error)
"""


def test_without_a_compiler_auto_falls_back_and_cpu_says_why(tmp_path):
  result = run_python(CHECK_FALLBACK, MEMJAX_CACHE_DIR=str(tmp_path), CXX="/nonexistent/c++")
  assert result.returncode == 0, result.stderr
  assert "reason: could not run the C++ compiler (/nonexistent/c++)" in result.stdout
  assert "auto: xla" in result.stdout
  assert "error: embedding_bag impl 'cpu' is not available: could not run" in result.stdout
  assert "the cpu lookup kernels are unavailable" in result.stderr  # warned once


def test_a_failing_compile_and_the_off_switch(tmp_path):
  result = run_python(CHECK_FALLBACK, MEMJAX_CACHE_DIR=str(tmp_path), CXX="false")
  assert "reason: false -O3" in result.stdout and "failed" in result.stdout, result.stderr
  assert "auto: xla" in result.stdout
  assert not list(tmp_path.glob("*.so"))  # no partial library left behind
  result = run_python(CHECK_FALLBACK, MEMJAX_CPU_KERNELS="0")
  assert "reason: turned off by MEMJAX_CPU_KERNELS=0" in result.stdout
  assert "auto: xla" in result.stdout and "RuntimeWarning" not in result.stderr


@pytest.mark.parametrize("tokens", [1, 3, 500])  # below and above the direct-gather cut-off
def test_bag_forward_paths_agree_with_xla(tokens):
  rng = np.random.default_rng(tokens)
  values = jnp.asarray(rng.standard_normal((4096, 40)), jnp.bfloat16)
  idx = jnp.asarray(rng.integers(-5, 4100, (tokens, 33)), jnp.int32)  # some out of range
  w = jnp.asarray(rng.standard_normal((tokens, 33)), jnp.float32)
  got = embedding_bag(values, idx, w, impl="cpu")
  want = embedding_bag(values, idx, w, impl="xla")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_top_k_refuses_a_k_it_cannot_take():
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 6, 20))
  with pytest.raises(ValueError, match="1 <= k <= 20"):
    cpu.top_k(x, 21)


def test_set_rows_takes_a_factor_only_for_a_float32_table():
  table = jnp.ones((500, 16), jnp.bfloat16)
  rows = jnp.asarray([3, 7], jnp.int32)
  with pytest.raises(ValueError, match="float32"):
    cpu.set_rows(table, rows, table[:2], jnp.float32(0.95))


def test_set_rows_with_the_cpu_impl_lowers_to_its_kernel():
  table, rows = jnp.ones((100, 8)), jnp.asarray([1, 2], jnp.int32)
  write = jax.jit(lambda t, r, n: set_rows(t, r, n, impl="cpu"), donate_argnums=0)
  assert "memjax_set_rows" in write.lower(table, rows, table[:2]).as_text()
