"""The cache directory: MEMJAX_CACHE_DIR, then XDG_CACHE_HOME, then ~/.cache."""

import pathlib

import pytest

from memjax.cache import cache_dir


@pytest.fixture
def environ(monkeypatch, tmp_path):
  monkeypatch.delenv("MEMJAX_CACHE_DIR", raising=False)
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  return monkeypatch


def test_memjax_cache_dir_wins_over_xdg_cache_home(environ, tmp_path):
  environ.setenv("MEMJAX_CACHE_DIR", str(tmp_path / "mine"))
  environ.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cache_dir() == tmp_path / "mine"


def test_xdg_cache_home_holds_a_memjax_folder_when_memjax_cache_dir_is_unset(environ, tmp_path):
  environ.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cache_dir() == tmp_path / "xdg" / "memjax"


def test_the_default_is_dot_cache_memjax_in_the_home_directory(environ, tmp_path):
  assert cache_dir() == tmp_path / "home" / ".cache" / "memjax"


def test_empty_variables_count_as_unset(environ, tmp_path):
  environ.setenv("MEMJAX_CACHE_DIR", "")
  environ.setenv("XDG_CACHE_HOME", "")
  assert cache_dir() == tmp_path / "home" / ".cache" / "memjax"


def test_parts_are_joined_under_it_and_nothing_is_created(environ, tmp_path):
  environ.setenv("MEMJAX_CACHE_DIR", str(tmp_path / "mine"))
  assert cache_dir("tensorflow_datasets", "x") == tmp_path / "mine" / "tensorflow_datasets" / "x"
  assert not (tmp_path / "mine").exists()
  assert isinstance(cache_dir(), pathlib.Path)
