"""User-given paths (run directories, checkpoints, config, data and tokenizer files) as
`etils.epath` paths: local, or an object store's URI (gs://bucket/x) read and written through
fsspec (gcsfs for gs://).

`pathlib` must never see a URI: it rewrites gs://bucket/x to the local folder gs:/bucket/x.

Data files are read through the helpers below rather than epath, which lacks three things a
corpus on GCS needs: a recursive glob (`**`), a version stamp finer than its stat's whole-second
mtime (GCS's generation), and a ranged read (its gs:// file reads ahead a 5 MB block, and its
readline reads a whole block per line). Local files are read as the os module reads them.
"""

from __future__ import annotations

import glob as glob_lib
import io
import os
import stat
from typing import BinaryIO, NamedTuple

from etils import epath


def is_remote(path: epath.PathLike) -> bool:
  """Whether `path` is an object store's URI: no directories, and no appending to a file."""
  return "://" in os.fspath(path)


def as_path(path: epath.PathLike) -> epath.Path:
  """`path` as an epath.Path: a URI as it is, a local path made absolute (epath's `resolve`
  would turn a URI into a local path)."""
  p = epath.Path(path)
  return p if is_remote(p) else p.resolve()


class FileVersion(NamedTuple):
  """What identifies one version of a file: a rewrite changes `stamp` (for a local file its mtime
  in ns; for a GCS object its generation, which every write renews)."""

  size: int
  stamp: int | str


def glob_files(pattern: str) -> dict[str, FileVersion]:
  """The files matching `pattern` (`**` matches any depth; folders are left out), unsorted, with
  their versions. For an object store, one listing however many files match (no request per
  file); a missing bucket matches nothing."""
  if not is_remote(pattern):
    found = {}
    for path in glob_lib.glob(pattern, recursive=True):
      try:
        st = os.stat(path)
      except OSError:
        continue  # a dangling link, or removed since listed
      if stat.S_ISREG(st.st_mode):
        found[path] = FileVersion(st.st_size, st.st_mtime_ns)
    return found
  protocol = pattern.split("://", 1)[0]
  try:
    listed = _filesystem(pattern).glob(pattern, detail=True)
  except FileNotFoundError:
    return {}
  return {
      f"{protocol}://{name}": _version(info) for name, info in listed.items()
      if info["type"] == "file"
  }


def file_version(path: str) -> FileVersion:
  """The file's current `FileVersion`."""
  if not is_remote(path):
    st = os.stat(path)
    return FileVersion(st.st_size, st.st_mtime_ns)
  return _version(_filesystem(path).info(path))


def open_binary(path: str) -> BinaryIO:
  """The file opened for buffered binary reads (lines, seek and read) as a local file is."""
  if not is_remote(path):
    return open(path, "rb")
  # Unbuffered by fsspec (every read is one ranged request), buffered by io in 16 MB reads.
  raw = _filesystem(path).open(path, "rb", cache_type="none")
  return io.BufferedReader(raw, buffer_size=1 << 24)


def read_range(path: str, start: int, stop: int) -> bytes:
  """Bytes [start, stop) of the file: for an object store, exactly one ranged request."""
  if not is_remote(path):
    with open(path, "rb") as f:
      f.seek(start)
      return f.read(stop - start)
  return _filesystem(path).cat_file(path, start, stop)


def _version(info: dict) -> FileVersion:
  # GCS's generation names the object's content: every write renews it, a metadata change (which
  # moves its mtime, `updated`) does not. Other stores: their mtime.
  return FileVersion(int(info["size"]), str(info.get("generation") or info.get("mtime")))


def _filesystem(uri: str):
  import fsspec  # with gcsfs: the `tpu` extra

  # No listing cache: a file rewritten while the process runs is seen as it is now.
  return fsspec.core.url_to_fs(uri, use_listings_cache=False)[0]
