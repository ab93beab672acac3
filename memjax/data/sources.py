"""Random-access sources of documents (strings): what `grain.MapDataset.source` reads.

- `tfds_source`: one text feature of a prepared TFDS dataset, read through its random-access
  data source (what `tfds.data_source` returns: ArrayRecord; local or gs:// data_dir; no
  TensorFlow).
- `file_source`: local files matching a glob; a `.jsonl` file holds one document per line (a JSON
  object with the text under `text_key`), any other file is one UTF-8 document.
- `lingua_source`: Lingua's layout, `root_dir/<name>/*.chunk.*.jsonl` for each named source, as a
  `Mixture` that the pipeline draws from in proportion to the sources' weights.
- `split_heldout`: the last documents of a source, held out for the eval loss.

Bad data fails when the source is made, with a `DataError` that names the file and position.
"""

from __future__ import annotations

import glob
import json
import pathlib
from typing import Mapping, Protocol, Sequence

import numpy as np
import tensorflow_datasets as tfds

from memjax.config import ConfigError


class DataError(ValueError):
  """Data a user can fix (empty, not UTF-8, malformed JSONL); the message says where."""


class DocumentSource(Protocol):
  """A finite, random-access sequence of documents."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> str: ...


class TfdsDocuments:
  """The `text_key` feature of a TFDS data source, decoded to str."""

  def __init__(self, records, text_key: str, description: str):
    self._records, self._text_key, self._description = records, text_key, description

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> str:
    return self._records[index][self._text_key].decode("utf-8")

  def __repr__(self) -> str:
    return f"TfdsDocuments({self._description}, {len(self)} documents)"


def tfds_source(
    name: str, split: str, data_dir: str | None = None, text_key: str = "text"
) -> TfdsDocuments:
  """The documents of `split` of the prepared TFDS dataset `name` (e.g. "my_dataset:1.0.0").

  `split` may be a TFDS slice, e.g. "train[:99%]" and "train[99%:]" for a held-out tail.
  Nothing is downloaded or prepared here: a dataset that is not under `data_dir` is an error.
  """
  where = f"TFDS dataset {name!r} split {split!r} in data.data_dir={data_dir or '(TFDS default)'}"
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise FileNotFoundError(f"{where}: no such dataset") from e
  if not builder.is_prepared():
    raise FileNotFoundError(f"{where}: not prepared (prepare it with file_format=array_record)")
  try:
    n_examples = builder.info.splits[split].num_examples
  except ValueError as e:  # an unknown split or a bad slice such as "train[:200%]"
    raise DataError(f"{where}: {e}") from e
  if n_examples == 0:
    raise DataError(f"{where}: holds no examples")
  try:
    records = builder.as_data_source(split=split)
  except NotImplementedError as e:  # prepared as TFRecord, which has no random access
    raise DataError(f"{where}: {e}") from e
  features = records[0]
  if text_key not in features:
    raise DataError(
        f"data.text_key: {where} has no feature {text_key!r}; it has {', '.join(sorted(features))}"
    )
  return TfdsDocuments(records, text_key, where)


class FileDocuments:
  """Documents in local files, indexed by (file, byte span); read from disk on access."""

  def __init__(self, paths: Sequence[str], file_index, starts, stops, text_key: str):
    self._paths = list(paths)
    self._file_index, self._starts, self._stops = file_index, starts, stops
    self._text_key = text_key

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, index: int) -> str:
    path = self._paths[self._file_index[index]]
    start, stop = int(self._starts[index]), int(self._stops[index])
    with open(path, "rb") as f:
      f.seek(start)
      data = f.read(stop - start).decode("utf-8")  # validated when indexed
    return json.loads(data)[self._text_key] if path.endswith(".jsonl") else data

  def __repr__(self) -> str:
    return f"FileDocuments({len(self._paths)} files, {len(self)} documents)"


def _index_jsonl(path: str, text_key: str) -> list[tuple[int, int]]:
  """The byte spans of the file's records, each checked: UTF-8, a JSON object with a str text."""
  spans, offset = [], 0
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, 1):
      start, offset = offset, offset + len(line)
      if not line.strip():
        continue  # blank lines (a trailing newline) are not records
      try:
        record = json.loads(line.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{line_no}: invalid UTF-8 at byte {start + e.start}: {e.reason}"
        ) from None
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: not a JSON object ({e.msg})") from None
      if not isinstance(record, dict) or text_key not in record:
        keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{path}:{line_no}: no key {text_key!r} (data.text_key); found {keys}")
      if not isinstance(text := record[text_key], str):
        kind = type(text).__name__
        raise DataError(f"{path}:{line_no}: {text_key!r} must be a string, got {kind}")
      spans.append((start, offset))
  return spans


def file_source(patterns: str | Sequence[str], text_key: str = "text") -> FileDocuments:
  """The documents of the files matching `patterns` (globs, `**` recursive), in path order."""
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  matches = {p for pattern in patterns for p in glob.glob(pattern, recursive=True)}
  paths = sorted(p for p in matches if pathlib.Path(p).is_file())
  if not paths:
    raise FileNotFoundError(f"data.path: no file matches {', '.join(map(repr, patterns))}")
  file_index, spans = [], []
  for i, path in enumerate(paths):
    if path.endswith(".jsonl"):
      found = _index_jsonl(path, text_key)
    else:
      data = pathlib.Path(path).read_bytes()
      try:
        data.decode("utf-8")
      except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start} (line {line})") from None
      found = [(0, len(data))] if data.strip() else []  # a blank file holds no document
    file_index += [i] * len(found)
    spans += found
  if not spans:
    raise DataError(f"data.path: the files matching {', '.join(map(repr, patterns))} are empty")
  starts, stops = np.array(spans, dtype=np.int64).reshape(-1, 2).T
  return FileDocuments(paths, np.array(file_index, np.int32), starts, stops, text_key)


class Mixture:
  """Named sources and their weights: the pipeline draws documents from each in proportion."""

  def __init__(self, parts: Mapping[str, DocumentSource], weights: Mapping[str, float]):
    self.parts, self.weights = dict(parts), {name: weights[name] for name in parts}

  def __len__(self) -> int:
    return sum(len(part) for part in self.parts.values())

  def __repr__(self) -> str:
    shares = [f"{n} {self.weights[n]:g} ({len(part)} documents)" for n, part in self.parts.items()]
    return f"Mixture({', '.join(shares)})"


# Lingua's chunk files: `<name>.chunk.<k>.jsonl`, one JSON object per line.
CHUNK_GLOB = "*.chunk.*.jsonl"


def lingua_source(root_dir: str, sources: Mapping[str, float], text_key: str = "text") -> Mixture:
  """The documents of Lingua's `root_dir/<name>/*.chunk.*.jsonl`, for each name of `sources`.

  Every chunk file of a source is read (Lingua gives each rank its own files; here the pipeline's
  shards split every source's documents instead, so any shard count works).
  """
  root = pathlib.Path(root_dir)
  if not root.is_dir():
    raise ConfigError("data.root_dir", f"no such directory: {root_dir}")
  parts = {}
  for name, weight in sources.items():
    if not weight > 0:
      raise ConfigError(f"data.sources.{name}", f"must be a weight > 0, got {weight}")
    chunks = sorted(root.joinpath(name).glob(CHUNK_GLOB))
    if not chunks:
      raise ConfigError(
          f"data.sources.{name}", f"no chunk files ({CHUNK_GLOB}) in {root.joinpath(name)}"
      )
    parts[name] = file_source([glob.escape(str(p)) for p in chunks], text_key)
  return Mixture(parts, sources)


class _Slice:
  """Documents [start, stop) of a source."""

  def __init__(self, source: DocumentSource, start: int, stop: int):
    self._source, self._start, self._stop = source, start, stop

  def __len__(self) -> int:
    return self._stop - self._start

  def __getitem__(self, index: int) -> str:
    if not 0 <= index < len(self):
      raise IndexError(f"document {index} of a slice of {len(self)}")
    return self._source[self._start + index]

  def __repr__(self) -> str:
    return f"documents [{self._start}, {self._stop}) of {self._source!r}"


def split_heldout(source: DocumentSource, n_heldout: int) -> tuple[DocumentSource, DocumentSource]:
  """(all but the last `n_heldout` documents, the last `n_heldout`): a train/eval split."""
  if not 1 <= n_heldout < len(source):
    raise ValueError(f"n_heldout: must be in [1, {len(source)}) (the documents), got {n_heldout}")
  cut = len(source) - n_heldout
  return _Slice(source, 0, cut), _Slice(source, cut, len(source))
