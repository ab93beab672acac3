"""pallas_kernels.cpu: the C++ top-k and product top-k against lax.top_k and the XLA path, the
bag's determinism, the in-place row write, and how the build fails (the embedding-bag and product-key tests run every
other check of the `cpu` impl)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.ops import embedding_bag, product_topk, set_rows
from pallas_kernels import cpu
from pallas_kernels.cpu import build

pytestmark = pytest.mark.skipif(
    not cpu.available(), reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}"
)


def assert_same_top_k(x, k):
  values, idx = jax.jit(cpu.top_k, static_argnums=1)(x, k)
  want_values, want_idx = jax.lax.top_k(x, k)
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_array_equal(values, want_values)


@pytest.mark.parametrize("shape,k", [((1, 1), 1), ((5, 7), 1), ((5, 7), 7), ((300, 256), 32),
                                     ((2, 3, 40), 9), ((1, 1000), 999)])
def test_top_k_equals_lax_top_k(shape, k):
  x = jax.random.normal(jax.random.PRNGKey(k), shape)
  assert_same_top_k(x, k)


def test_top_k_ties_signed_zeros_infinities_and_nans_order_as_lax_top_k():
  rng = np.random.default_rng(0)
  x = rng.integers(-2, 3, (64, 50)).astype(np.float32)  # ties everywhere
  x[:, 3], x[:, 4], x[:, 5], x[:, 6] = -0.0, 0.0, np.inf, -np.inf
  x[::3, 7] = np.nan
  x[1::3, 8] = -np.nan
  for k in (1, 5, 17, 50):
    assert_same_top_k(jnp.asarray(x), k)


def test_top_k_of_bfloat16_and_its_gradient():
  x = jax.random.normal(jax.random.PRNGKey(1), (33, 64)).astype(jnp.bfloat16)
  assert_same_top_k(x, 8)
  x32 = x.astype(jnp.float32)
  cot = jax.random.normal(jax.random.PRNGKey(2), (33, 8))
  grad = jax.grad(lambda x: jnp.sum(cpu.top_k(x, 8)[0] * cot))(x32)
  want = jax.grad(lambda x: jnp.sum(jax.lax.top_k(x, 8)[0] * cot))(x32)
  np.testing.assert_array_equal(grad, want)


def test_top_k_under_vmap_and_bad_k():
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 6, 20))
  values, idx = jax.vmap(lambda x: cpu.top_k(x, 5))(x)
  np.testing.assert_array_equal(idx, jax.lax.top_k(x, 5)[1])
  with pytest.raises(ValueError, match="1 <= k <= 20"):
    cpu.top_k(x, 21)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_product_topk_equals_the_xla_path(dtype):
  # float32 takes the fused kernel; bfloat16 the generic path with the kernel's top-k.
  s1, s2 = (jax.random.normal(jax.random.PRNGKey(i), (512, 64)).astype(dtype) for i in (4, 5))
  for knn in (1, 7, 32, 64):
    got = product_topk(s1, s2, knn, impl="cpu")
    want = product_topk(s1, s2, knn, impl="xla")
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


def test_bag_is_deterministic_across_runs_and_threads():
  rng = np.random.default_rng(0)
  values = jnp.asarray(rng.standard_normal((5000, 96)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, 300, (2048, 64)), jnp.int32)  # many duplicates
  w = jnp.asarray(rng.random((2048, 64)), jnp.float32)
  grad = jax.jit(
      jax.grad(lambda v, w: jnp.sum(embedding_bag(v, idx, w, impl="cpu") ** 2), argnums=(0, 1))
  )
  first, second = grad(values, w), grad(values, w)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


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
    from memjax.ops import embedding_bag, resolve_impl
    from pallas_kernels import cpu
    print("reason:", cpu.unavailable_reason())
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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32])
def test_set_rows_writes_the_listed_rows_in_place_and_skips_padding(dtype):
  rng = np.random.default_rng(0)
  n_slots, dim = 1000, 24
  rows = np.sort(rng.choice(n_slots, 60, replace=False)).astype(np.int32)
  rows[-7:] = n_slots  # padding, as compact_rows pads
  table = jnp.asarray(rng.standard_normal((n_slots, dim)) * 100, dtype)
  new = jnp.asarray(rng.standard_normal((60, dim)) * 100, dtype)
  want = np.asarray(table.at[rows].set(new, mode="drop"))
  write = jax.jit(lambda t, r, n: set_rows(t, r, n, impl="cpu"), donate_argnums=0)
  assert "memjax_set_rows" in write.lower(table, rows, new).as_text()
  address = table.unsafe_buffer_pointer()
  got = write(table, jnp.asarray(rows), new)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert got.unsafe_buffer_pointer() == address  # the donated table itself, not a copy


def test_set_rows_with_a_factor_scales_every_other_row_as_xla_does():
  rng = np.random.default_rng(1)
  table = jnp.asarray(rng.standard_normal((500, 16)), jnp.float32)
  rows = jnp.asarray([3, 7, 499, 500], jnp.int32)
  new = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
  factor = jnp.float32(0.95)
  want = np.asarray((factor * table).at[rows].set(new, mode="drop"))
  got = jax.jit(lambda t, f: set_rows(t, rows, new, impl="cpu", factor=f), donate_argnums=0)(
      table, factor)
  np.testing.assert_array_equal(np.asarray(got), want)
  with pytest.raises(ValueError, match="float32"):
    cpu.set_rows(jnp.asarray(want, jnp.bfloat16), rows, new, factor)
