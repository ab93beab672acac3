"""Text, JSONL and Lingua chunk files -> tokenized ArrayRecord shards (`data.source=arrayrecord`).

    python -m memjax.data.prepare INPUT... --output DIR [--processes N] [--shard-mb MB]
        [config=NAME_OR_PATH] [data.tokenizer=KIND] [data.tokenizer_path=FILE] [data.text_key=KEY]

INPUT is a file, a glob or a directory, local or on an object store (gs://bucket/corpus/*.jsonl).
A directory means its Lingua chunk files (`*.chunk.*.jsonl`, any depth) if it has some, else its
`*.jsonl` and `*.txt` files. As for `data.source=files`, a `.jsonl` file holds one document per
line (a JSON object with the text under `data.text_key`; blank lines are skipped) and any other
file is one UTF-8 document. The tokenizer and text key are the run's: `data.*` of the config
(default `tiny`) and overrides, as train.py reads them.

DIR receives `shard-00000-of-000NN.array_record` files (one record per document: its token ids,
without BOS or EOS, little-endian uint16 when the vocabulary fits, else int32) and
`metadata.json` (tokenizer, dtype, counts, shards), which `arrayrecord_source` reads to check
that a run's tokenizer is the one the shards were made with. DIR is local: ArrayRecord's writer
opens local files only (its reader also reads gs://), so for a run on GCS prepare into a local
directory, copy it whole (`gcloud storage cp -r DIR gs://bucket/prepared`) and train with
`data.path=gs://bucket/prepared`. A gs:// DIR is refused.

Plan. The inputs are cut into shards of about `--shard-mb` MB of input each: a JSONL file at
line boundaries, a text file whole (small files share a shard). A shard is one task of a
process pool and depends only on its input bytes, so any process count writes the same files.

Resuming. `DIR/prepare_plan.json` records the plan (inputs with sizes and mtimes, or GCS
generations; tokenizer; shards); a shard's line is appended to `DIR/prepare_progress.jsonl` once
its file is complete. A rerun with the same plan skips those shards and rewrites any other (a
partial one included); a different plan (changed inputs or settings) is refused. `metadata.json`
is written last.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import pathlib
import sys
import time
from typing import Mapping, Sequence

import numpy as np
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from memjax.cli import InputError, entry_point
from memjax.data.sources import (
    CHUNK_GLOB,
    PREPARED_FORMAT,
    PREPARED_METADATA,
    DataError,
    check_jsonl_record,
    check_text,
    tokenizer_identity,
)
from memjax.data.tokenizers import ByteTokenizer, Tokenizer, make_tokenizer
from memjax.paths import FileVersion, glob_files, is_remote, open_binary, read_range

PLAN_FILE = "prepare_plan.json"
PROGRESS_FILE = "prepare_progress.jsonl"
# One record per chunk: a document is read without decompressing its neighbours. zstd level 1
# writes token ids a third faster than the default level 3, to the same size (measured).
WRITER_OPTIONS = "group_size:1,zstd:1"


def expand_inputs(inputs: Sequence[str]) -> dict[str, FileVersion]:
  """The files of `inputs` (files, globs, directories) and their versions, each input's sorted,
  without repeats."""
  files: dict[str, FileVersion] = {}
  for item in inputs:
    if epath.Path(item).is_dir():
      found = glob_files(os.path.join(glob.escape(item), "**", CHUNK_GLOB))
      if not found:
        for ext in ("jsonl", "txt"):
          found |= glob_files(os.path.join(glob.escape(item), "**", f"*.{ext}"))
    else:
      found = glob_files(item)
    if not found:
      raise FileNotFoundError(f"input {item!r}: no such file, or no file in it or matching it")
    for path in sorted(found):
      files.setdefault(path, found[path])
  return files


def _line_end_after(path: str, offset: int, size: int) -> int:
  """The position just past the first newline at or after `offset` (the file's size if none)."""
  while offset < size:
    # Small ranged reads: on GCS a buffered file would fetch 16 MB to find one newline.
    block = read_range(path, offset, min(offset + (1 << 16), size))
    if (found := block.find(b"\n")) >= 0:
      return offset + found + 1
    offset += len(block)
  return size


def plan_shards(
    files: Mapping[str, FileVersion], shard_bytes: int
) -> list[list[tuple[int, int, int]]]:
  """Shards as lists of pieces (input index, start byte, stop byte), about `shard_bytes` each."""
  shards, current, current_bytes = [], [], 0
  for i, (path, version) in enumerate(files.items()):
    size = version.size
    start = 0
    while start < size:
      want = shard_bytes - current_bytes
      if path.endswith(".jsonl") and size - start > want:
        stop = _line_end_after(path, start + want, size)
      else:
        stop = size  # a text file is one document; a JSONL tail that fits
      current.append((i, start, stop))
      current_bytes += stop - start
      start = stop
      if current_bytes >= shard_bytes:
        shards.append(current)
        current, current_bytes = [], 0
  if current:
    shards.append(current)
  return shards


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}.array_record"


# ----------------------------------------------------------------------------------------------
# One shard: read its pieces, tokenize every document, write one record each.

_tokenizer: Tokenizer | None = None


def _init_worker(kind: str, model_path: str | None) -> None:
  global _tokenizer
  _tokenizer = make_tokenizer(kind, model_path)


def _token_bytes(tokenizer: Tokenizer, text: str, dtype: np.dtype) -> tuple[bytes, int]:
  if isinstance(tokenizer, ByteTokenizer):
    ids = np.frombuffer(text.encode("utf-8"), np.uint8)  # its encode, without a list of ints
  else:
    ids = np.array(tokenizer.encode(text), np.int64)
  return ids.astype(dtype).tobytes(), len(ids)


def _line_number(path: str, offset: int) -> int:
  """The 1-based number of the line that starts at byte `offset`."""
  count, done = 1, 0
  with open_binary(path) as f:
    while done < offset:
      block = f.read(min(1 << 24, offset - done))
      count, done = count + block.count(b"\n"), done + len(block)
  return count


def _documents(path: str, start: int, stop: int, text_key: str):
  """The texts of a piece of an input file, checked as `file_source` checks them."""
  data = read_range(path, start, stop)
  if not path.endswith(".jsonl"):
    text = check_text(data, path)
    if text.strip():  # a blank file holds no document
      yield text
    return
  offset = start
  for k, line in enumerate(data.split(b"\n")):
    if line.strip():
      try:
        yield check_jsonl_record(line, path, k + 1, offset, text_key)
      except DataError:
        # Raised again with the line's number in the file; pieces start anywhere in it.
        check_jsonl_record(line, path, _line_number(path, start) + k, offset, text_key)
    offset += len(line) + 1


def _write_shard(task: dict) -> dict:
  """Writes shard `task["name"]` (to a partial file, renamed when whole); returns its counts."""
  dtype = np.dtype(task["dtype"]).newbyteorder("<")
  final = pathlib.Path(task["output"], task["name"])
  partial = final.with_name(final.name + ".partial")
  documents = tokens = 0
  writer = ArrayRecordWriter(str(partial), WRITER_OPTIONS)
  try:
    for path, start, stop in task["pieces"]:
      for text in _documents(path, start, stop, task["text_key"]):
        record, n = _token_bytes(_tokenizer, text, dtype)
        writer.write(record)
        documents, tokens = documents + 1, tokens + n
  finally:
    writer.close()
  os.replace(partial, final)
  return {
      "shard": task["index"], "file": task["name"], "documents": documents, "tokens": tokens,
      "bytes": sum(stop - start for _, start, stop in task["pieces"]),
      "file_bytes": final.stat().st_size,
  }


# ----------------------------------------------------------------------------------------------
# The whole job.


def _write_json(path: pathlib.Path, data) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(data, indent=1) + "\n")
  os.replace(tmp, path)  # never a half-written file under the real name


def _finished(output: pathlib.Path) -> dict[int, dict]:
  """The shards the progress file records whose files are still whole."""
  done = {}
  progress = output / PROGRESS_FILE
  if progress.is_file():
    for line in progress.read_text().splitlines():
      try:
        stats = json.loads(line)
      except json.JSONDecodeError:
        continue  # the last line of an interrupted append
      shard = output / stats["file"]
      if shard.is_file() and shard.stat().st_size == stats["file_bytes"]:
        done[stats["shard"]] = stats
  return done


def _check_plan(output: pathlib.Path, plan: dict) -> None:
  """Records the plan in a new output directory; refuses one prepared to another plan."""
  path = output / PLAN_FILE
  if not path.is_file():
    if any(output.glob("*.array_record")) or (output / PREPARED_METADATA).exists():
      raise DataError(f"--output: {output} holds shards of another preparation; choose another")
    _write_json(path, plan)
    return
  saved = json.loads(path.read_text())
  if saved != plan:
    differ = [k for k in plan if saved.get(k) != plan[k]]
    raise DataError(
        f"--output: {output} was prepared from other {', '.join(differ)} (see {path}); "
        "choose another directory, or delete it to start again"
    )


def prepare(
    inputs: Sequence[str],
    output: str | os.PathLike,
    *,
    tokenizer: str = "bytes",
    tokenizer_path: str | None = None,
    text_key: str = "text",
    processes: int | None = None,
    shard_bytes: int = 128 << 20,
    progress: bool = True,
) -> dict:
  """Prepares `inputs` into `output` (see the module docstring); returns the metadata written,
  plus this call's `written` and `skipped` shard counts and `seconds`."""
  t0 = time.perf_counter()
  if shard_bytes < 1:
    raise InputError(f"--shard-mb: must be > 0, got {shard_bytes} bytes")
  processes = processes or os.cpu_count() or 1
  if processes < 1:
    raise InputError(f"--processes: must be >= 1, got {processes}")
  if is_remote(output):
    raise InputError(
        f"--output: {output}: ArrayRecord writes local files only; prepare into a local directory "
        f"and copy it there (gcloud storage cp -r DIR {output}), then train with "
        f"data.path={output}"
    )
  files = expand_inputs(inputs)
  if not sum(v.size for v in files.values()):
    raise DataError(f"the inputs {', '.join(map(repr, inputs))} are empty")
  tok = make_tokenizer(tokenizer, tokenizer_path)
  dtype = "uint16" if tok.vocab_size <= 1 << 16 else "int32"
  shards = plan_shards(files, shard_bytes)
  paths = list(files)
  plan = {
      "format": PREPARED_FORMAT,
      "inputs": [
          [p if is_remote(p) else os.path.abspath(p), v.size, v.stamp] for p, v in files.items()
      ],
      "tokenizer": tokenizer_identity(tok, tokenizer_path),
      "text_key": text_key,
      "dtype": dtype,
      "shards": [[list(piece) for piece in pieces] for pieces in shards],
  }
  out = pathlib.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  _check_plan(out, plan)
  done = _finished(out)
  tasks = [
      {
          "index": i, "name": shard_name(i, len(shards)), "output": str(out), "dtype": dtype,
          "text_key": text_key, "pieces": [(paths[p], a, b) for p, a, b in pieces],
      }
      for i, pieces in enumerate(shards) if i not in done
  ]
  total_bytes = sum(b - a for pieces in shards for _, a, b in pieces)
  bar = tqdm.tqdm(
      total=total_bytes, initial=sum(s["bytes"] for s in done.values()), unit="B",
      unit_scale=True, desc="prepare", disable=not progress, file=sys.stderr,
  )
  written = []
  with bar, open(out / PROGRESS_FILE, "a+b") as log:
    log.seek(0)
    if not log.read().endswith(b"\n") and log.tell():
      log.write(b"\n")  # after an interrupted append, so that the next line stands alone
    if processes == 1 or len(tasks) <= 1:
      _init_worker(tokenizer, tokenizer_path)
      results = map(_write_shard, tasks)
      pool = None
    else:
      pool = multiprocessing.get_context("spawn").Pool(
          min(processes, len(tasks)), _init_worker, (tokenizer, tokenizer_path)
      )
      results = pool.imap_unordered(_write_shard, tasks)
    try:
      for stats in results:
        log.write(json.dumps(stats).encode() + b"\n")
        log.flush()
        os.fsync(log.fileno())  # a recorded shard survives a crash that follows
        written.append(stats)
        bar.update(stats["bytes"])
    finally:
      if pool is not None:
        pool.terminate()
        pool.join()
  by_index = {**done, **{s["shard"]: s for s in written}}
  stats = [by_index[i] for i in range(len(shards))]
  documents = sum(s["documents"] for s in stats)
  if not documents:
    raise DataError(f"the inputs {', '.join(map(repr, inputs))} hold no documents")
  metadata = {
      "format": PREPARED_FORMAT,
      "tokenizer": plan["tokenizer"],
      "tokenizer_path": tokenizer_path,
      "text_key": text_key,
      "dtype": dtype,
      "documents": documents,
      "tokens": sum(s["tokens"] for s in stats),
      "bytes": total_bytes,
      "inputs": [p for p, _, _ in plan["inputs"]],
      "shards": [{k: s[k] for k in ("file", "documents", "tokens", "bytes")} for s in stats],
  }
  _write_json(out / PREPARED_METADATA, metadata)
  seconds = time.perf_counter() - t0
  return {**metadata, "written": len(written), "skipped": len(done), "seconds": seconds,
          "written_bytes": sum(s["bytes"] for s in written),
          "written_tokens": sum(s["tokens"] for s in written)}


def summary(result: dict, processes: int) -> str:
  """One line: what was prepared, and this call's throughput."""
  secs = max(result["seconds"], 1e-9)
  return (
      f"prepared {result['documents']:,} documents, {result['tokens']:,} tokens, "
      f"{result['bytes'] / 1e6:,.1f} MB in {len(result['shards'])} shards "
      f"({result['written']} written, {result['skipped']} already done) in {secs:.1f} s: "
      f"{result['written_bytes'] / 1e6 / secs:,.1f} MB/s, "
      f"{result['written_tokens'] / secs / 1e6:,.2f}M tokens/s ({processes} processes)"
  )


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  # `config=` and `data.*=` name the tokenizer as a run's config does; the rest are inputs.
  is_config = lambda a: a.startswith(("config=", "data.")) and "=" in a  # noqa: E731
  parser = argparse.ArgumentParser(
      prog="python -m memjax.data.prepare",
      description="Tokenize text / JSONL / Lingua chunk files into ArrayRecord shards.",
      epilog="config=NAME_OR_PATH and data.tokenizer=, data.tokenizer_path=, data.text_key= "
      "choose the tokenizer and text key as in train.py (default config: tiny, bytes).",
  )
  parser.add_argument("inputs", nargs="+", help="files, globs or directories")
  parser.add_argument("--output", required=True, help="directory for the shards")
  parser.add_argument("--processes", type=int, default=0, help="default: one per CPU")
  parser.add_argument("--shard-mb", type=float, default=128, help="input MB per shard")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  args = parser.parse_args([a for a in argv if not is_config(a)])

  from memjax import config_loading  # YAML and the interop mappings, for the command line only

  path, _, overrides = config_loading.split_command_line([a for a in argv if is_config(a)])
  data = config_loading.load(path, overrides).data
  processes = args.processes or os.cpu_count() or 1
  result = prepare(
      args.inputs, args.output, tokenizer=data.tokenizer,
      tokenizer_path=data.tokenizer_path or None, text_key=data.text_key,
      processes=processes, shard_bytes=int(args.shard_mb * (1 << 20)),
      progress=not args.quiet,
  )
  print(summary(result, processes))
  print(f"train on them with data.source=arrayrecord data.path={args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
