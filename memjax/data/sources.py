"""Random-access sources of documents (text, or token ids): what `grain.MapDataset.source` reads.

- `tfds_source`: one text feature of a prepared TFDS dataset, read through its random-access
  data source (what `tfds.data_source` returns: ArrayRecord; local or gs:// data_dir; no
  TensorFlow).
- `file_source`: files matching a glob, local or on an object store (gs://bucket/corpus/*.jsonl);
  a `.jsonl` file holds one document per line (a JSON object with the text under `text_key`),
  any other file is one UTF-8 document. Each file is checked and indexed (the byte span of every
  document) once per version: the index is cached under memjax's (local) cache directory, keyed
  by the file's path or URI, size and version stamp (mtime; GCS's generation), so a restart reads
  the index and reads a document's bytes, one ranged read, only when the pipeline reads it.
- `arrayrecord_source`: a directory of tokenized ArrayRecord shards written by
  `python -m memjax.data.prepare` (local, or copied to gs://: ArrayRecord reads it through its own
  GCS client); its documents are token ids (read by record, no parsing or tokenizing), made by
  the tokenizer the run names (checked).
- `lingua_source`: Lingua's layout, `root_dir/<name>/*.chunk.*.jsonl` for each named source (local
  or on an object store), as a `Mixture` that the pipeline draws from in proportion to the
  sources' weights.
- `split_heldout`: the last documents of a source, held out for the eval loss.

Bad data fails when the source is made, with a `DataError` that names the file and position.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pathlib
import tempfile
import threading
from typing import Mapping, Protocol, Sequence

import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader
from etils import epath

from memjax.cache import cache_dir
from memjax.config import ConfigError
from memjax.data.tokenizers import Tokenizer
from memjax.paths import FileVersion, file_version, glob_files, is_remote, open_binary, read_range


class DataError(ValueError):
  """Data a user can fix (empty, not UTF-8, malformed JSONL); the message says where."""


class DocumentSource(Protocol):
  """A finite, random-access sequence of documents: text, or token ids already tokenized."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> str | np.ndarray: ...


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
  """Documents in files, indexed by (file, byte span); read on access (one ranged read)."""

  def __init__(self, paths: Sequence[str], spans: Sequence[np.ndarray], text_key: str):
    self._paths, self._spans, self._text_key = list(paths), list(spans), text_key
    # Document i is in the first file whose cumulative count exceeds i.
    self._ends = np.cumsum([len(s) for s in self._spans])

  def __len__(self) -> int:
    return int(self._ends[-1])

  def __getitem__(self, index: int) -> str:
    if not 0 <= index < len(self):
      raise IndexError(f"document {index} of {len(self)}")
    i = int(np.searchsorted(self._ends, index, side="right"))
    path = self._paths[i]
    start, stop = self._spans[i][index - (int(self._ends[i - 1]) if i else 0)]
    data = read_range(path, int(start), int(stop)).decode("utf-8")  # validated when indexed
    return json.loads(data)[self._text_key] if path.endswith(".jsonl") else data

  def __repr__(self) -> str:
    return f"FileDocuments({len(self._paths)} files, {len(self)} documents)"


def _index_jsonl(path: str, text_key: str) -> list[tuple[int, int]]:
  """The byte spans of the file's records, each checked: UTF-8, a JSON object with a str text."""
  spans, offset = [], 0
  with open_binary(path) as f:
    for line_no, line in enumerate(f, 1):
      start, offset = offset, offset + len(line)
      if not line.strip():
        continue  # blank lines (a trailing newline) are not records
      check_jsonl_record(line, path, line_no, start, text_key)
      spans.append((start, offset))
  return spans


def check_jsonl_record(line: bytes, path: str, line_no: int, start: int, text_key: str) -> str:
  """The text of one JSONL line; a `DataError` naming the file and line if it has none."""
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
    raise DataError(f"{path}:{line_no}: {text_key!r} must be a string, got {type(text).__name__}")
  return text


def check_text(data: bytes, path: str) -> str:
  """A text file's content as str; a `DataError` naming the byte and line if it is not UTF-8."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"{path}: invalid UTF-8 at byte {e.start} (line {line})") from None


def _index_file(path: str, text_key: str) -> np.ndarray:
  """The (documents, 2) int64 byte spans of a file's documents, checked."""
  if path.endswith(".jsonl"):
    spans = _index_jsonl(path, text_key)
  else:
    data = epath.Path(path).read_bytes()
    check_text(data, path)
    spans = [(0, len(data))] if data.strip() else []  # a blank file holds no document
  return np.array(spans, dtype=np.int64).reshape(-1, 2)


def _index_cache_path(path: str, version: FileVersion, text_key: str) -> pathlib.Path:
  # The text key matters only to JSONL files, whose records it validates.
  jsonl_key = path.endswith(".jsonl") and text_key
  where = path if is_remote(path) else os.path.realpath(path)
  key = [where, version.size, version.stamp, jsonl_key]
  digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()
  return cache_dir("file_index", f"{digest}.npy")


def _cached_index(path: str, before: FileVersion, text_key: str) -> np.ndarray:
  """`_index_file`, read from the cache when the file is unchanged since it was indexed;
  `before` is the file's version when it was listed."""
  cached = _index_cache_path(path, before, text_key)
  try:
    return np.load(cached)
  except (OSError, ValueError):
    pass  # not indexed yet, or an unreadable entry: index again
  spans = _index_file(path, text_key)
  # A file written while being indexed is indexed again next time (reading it may change atime).
  if file_version(path) == before:
    try:
      cached.parent.mkdir(parents=True, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=cached.parent, suffix=".tmp", delete=False) as f:
        np.save(f, spans)
      os.replace(f.name, cached)  # readers never see a half-written entry
    except OSError:
      pass  # a read-only cache only costs the next start the indexing
  return spans


def file_source(patterns: str | Sequence[str], text_key: str = "text") -> FileDocuments:
  """The documents of the files matching `patterns` (globs, `**` recursive; local or URIs such as
  gs://bucket/corpus/*.jsonl), in path order."""
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  files = {p: v for pattern in patterns for p, v in glob_files(pattern).items()}
  if not files:
    raise FileNotFoundError(f"data.path: no file matches {', '.join(map(repr, patterns))}")
  what = f"data.path: the files matching {', '.join(map(repr, patterns))}"
  return _file_documents(files, text_key, what)


def _file_documents(files: Mapping[str, FileVersion], text_key: str, what: str) -> FileDocuments:
  """The documents of `files` (listed with their versions), in path order; `what` names them."""
  paths = sorted(files)
  spans = [_cached_index(path, files[path], text_key) for path in paths]
  if not sum(len(s) for s in spans):
    raise DataError(f"{what} are empty")
  return FileDocuments(paths, spans, text_key)


# A directory prepared by `python -m memjax.data.prepare`: ArrayRecord shards of token ids (one
# document per record, little-endian `dtype`, no BOS or EOS) and this file, which describes them.
PREPARED_METADATA = "metadata.json"
PREPARED_FORMAT = "memjax.prepared.v1"


def tokenizer_identity(tokenizer: Tokenizer, model_path: str | None) -> dict:
  """What prepared shards record of their tokenizer, and what a reader must match."""
  sha256 = None
  if model_path:
    sha256 = hashlib.sha256(epath.Path(model_path).read_bytes()).hexdigest()
  return {
      "kind": tokenizer.name, "model_sha256": sha256, "vocab_size": tokenizer.vocab_size,
      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
  }


class TokenDocuments:
  """Prepared documents: token ids (int32, unframed) read by record from ArrayRecord shards.

  Read with the reader's range read (`read(i, i + 1)`): its read by indices, which grain's
  `ArrayRecordDataSource` uses, walks every chunk of the file on each call (measured 250 us a
  record in a shard of 60k, against 27 us), and a shard holds a record per document.
  """

  def __init__(self, files: Sequence[str], counts: Sequence[int], dtype: str, where: str):
    self._files, self._where = list(files), where
    self._dtype = np.dtype(dtype).newbyteorder("<")
    self._ends = np.cumsum(counts)
    self._readers: list = [None] * len(self._files)  # opened on first read, shared by threads
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._ends[-1])

  def _reader(self, i: int):
    if self._readers[i] is None:
      with self._lock:
        if self._readers[i] is None:
          self._readers[i] = ArrayRecordReader(
              self._files[i], "readahead_buffer_size:0", file_reader_buffer_size=1 << 15
          )
    return self._readers[i]

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < len(self):
      raise IndexError(f"document {index} of {len(self)}")
    i = int(np.searchsorted(self._ends, index, side="right"))
    position = index - (int(self._ends[i - 1]) if i else 0)
    (record,) = self._reader(i).read(position, position + 1)
    return np.frombuffer(record, self._dtype).astype(np.int32)

  def __repr__(self) -> str:
    return f"TokenDocuments({self._where}, {len(self)} documents)"


def arrayrecord_source(
    path: str, tokenizer: Tokenizer, tokenizer_path: str | None = None, field: str = "data.path"
) -> TokenDocuments:
  """The documents prepared into directory `path`, which must be tokenized as `tokenizer` is.

  `tokenizer_path` is the tokenizer's model file (none for bytes): prepared shards record the
  file's hash and refuse another. `field` names the config field `path` came from.
  """
  root = epath.Path(path)
  meta_path = root / PREPARED_METADATA
  if not meta_path.is_file():
    raise FileNotFoundError(
        f"{field}: no {PREPARED_METADATA} in {path}: not a directory prepared by "
        "`python -m memjax.data.prepare`, or its preparation has not finished (run it again)"
    )
  meta = json.loads(meta_path.read_text())
  if meta.get("format") != PREPARED_FORMAT:
    raise DataError(f"{meta_path}: format {meta.get('format')!r}, expected {PREPARED_FORMAT!r}")
  theirs, ours = meta["tokenizer"], tokenizer_identity(tokenizer, tokenizer_path)
  if theirs["kind"] != ours["kind"]:
    raise ConfigError(
        "data.tokenizer",
        f"{path} was tokenized with {theirs['kind']!r}, this run's tokenizer is {ours['kind']!r}",
    )
  if theirs != ours:
    differ = ", ".join(f"{k} {theirs[k]} vs {ours[k]}" for k in ours if theirs.get(k) != ours[k])
    raise ConfigError(
        "data.tokenizer_path",
        f"{path} was tokenized with another {ours['kind']} model than {tokenizer_path!r} "
        f"(prepared vs this run: {differ})",
    )
  if not meta["documents"]:
    raise DataError(f"{field}: {path} holds no documents")
  shards = [root / s["file"] for s in meta["shards"] if s["documents"]]
  missing = [str(p) for p in shards if not p.is_file()]
  if missing:
    raise FileNotFoundError(f"{field}: {path} lacks the shards {', '.join(missing[:3])}")
  counts = [s["documents"] for s in meta["shards"] if s["documents"]]
  return TokenDocuments([str(p) for p in shards], counts, meta["dtype"], str(path))


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
  """The documents of Lingua's `root_dir/<name>/*.chunk.*.jsonl`, for each name of `sources`
  (`root_dir` local, or a URI such as gs://bucket/lingua).

  Every chunk file of a source is read (Lingua gives each rank its own files; here the pipeline's
  shards split every source's documents instead, so any shard count works).
  """
  root = epath.Path(root_dir)
  if not root.is_dir():
    raise ConfigError("data.root_dir", f"no such directory: {root_dir}")
  parts = {}
  for name, weight in sources.items():
    if not weight > 0:
      raise ConfigError(f"data.sources.{name}", f"must be a weight > 0, got {weight}")
    folder = os.fspath(root / name)
    chunks = glob_files(f"{glob.escape(folder)}/{CHUNK_GLOB}")
    if not chunks:
      raise ConfigError(f"data.sources.{name}", f"no chunk files ({CHUNK_GLOB}) in {folder}")
    what = f"data.sources.{name}: the chunk files in {folder}"
    parts[name] = _file_documents(chunks, text_key, what)
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
