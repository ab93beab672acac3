"""memjax.ops.dispatch: impl names come from the one table, "auto" picks by platform, and a
kernel package either loads or says why it cannot."""

import importlib

import jax
import jax.numpy as jnp
import pytest

from memjax.ops import auto_impl, available_impls, dispatch, embedding_bag, resolve_impl
from memjax.ops import unavailable_reason
from pallas_kernels import impls


def test_the_table_names_each_impl_once_and_each_platform_at_most_once():
  assert len(set(impls.NAMES)) == len(impls.NAMES)
  platforms = [impl.platform for impl in impls.IMPLS if impl.platform is not None]
  assert len(set(platforms)) == len(platforms)
  assert impls.named("xla").platform is None  # the twin runs everywhere


@pytest.mark.parametrize("impl", impls.IMPLS, ids=lambda impl: impl.name)
def test_every_package_loads_its_kernels_or_says_why_not(impl):
  package = importlib.import_module(impl.package)
  try:
    kernels = package.load()
  except impls.Unavailable as error:
    assert str(error) and unavailable_reason(impl.name) == str(error)
    assert impl.name not in available_impls()
    return
  assert isinstance(kernels, impls.Kernels)
  assert callable(kernels.bag_forward) and callable(kernels.bag_backward)
  assert impl.name in available_impls() and unavailable_reason(impl.name) is None


def test_auto_is_the_platforms_impl_or_the_twin():
  for impl in impls.IMPLS:
    if impl.platform is not None:
      assert auto_impl(impl.platform) == impl.name
  assert auto_impl("some_future_platform") == "xla"
  here = auto_impl(jax.default_backend())
  assert resolve_impl("auto") == (here if unavailable_reason(here) is None else "xla")


def test_unknown_and_unavailable_impls_fail_clearly():
  values, idx, w = jnp.ones((10, 4)), jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3))
  with pytest.raises(ValueError, match="not available; choose 'auto' or one of xla, cpu"):
    embedding_bag(values, idx, w, impl="cuda")
  for name in impls.NAMES:
    reason = unavailable_reason(name)
    if reason is not None:
      with pytest.raises(ValueError, match=f"impl '{name}' is not available: "):
        embedding_bag(values, idx, w, impl=name)


def test_a_new_table_entry_is_all_an_impl_needs(monkeypatch):
  # A package that loads the twin's kernels under another name: dispatch takes it from the
  # table alone.
  entry = impls.Impl("twin_again", "pallas_kernels.xla")
  monkeypatch.setattr(dispatch, "_loaded", dict(dispatch._loaded))
  monkeypatch.setattr(impls, "IMPLS", (*impls.IMPLS, entry))
  monkeypatch.setattr(impls, "NAMES", (*impls.NAMES, entry.name))
  values, idx, w = jnp.ones((10, 4)), jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3))
  assert "twin_again" in available_impls()
  assert (embedding_bag(values, idx, w, impl="twin_again") == 3).all()
