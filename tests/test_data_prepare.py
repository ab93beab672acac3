"""Preparing text, JSONL and Lingua chunk files into tokenized ArrayRecord shards; reading them."""

import contextlib
import dataclasses
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from memjax import config_loading, data
from memjax.config import ConfigError
from memjax.data import prepare, sources
from memjax.data.sources import DataError
from memjax.training import loop

from support.training import logged, smoke_config

TEXTS = [f"document {i}: " + "Grüße aus Köln — naïve café 東京. " * (i % 7) for i in range(60)]


def write_jsonl(path, texts, key="text"):
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = [json.dumps({key: t, "id": i}, ensure_ascii=False) for i, t in enumerate(texts)]
  path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # a blank tail, as files allow
  return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Two JSONL files (the documents split between them)."""
  root = tmp_path_factory.mktemp("corpus")
  write_jsonl(root / "a.jsonl", TEXTS[:25])
  write_jsonl(root / "b.jsonl", TEXTS[25:])
  return root


@pytest.fixture(scope="module")
def sentencepiece_models(tmp_path_factory):
  """Two tiny BPE models trained here, of different vocabularies."""
  import sentencepiece as spm

  root = tmp_path_factory.mktemp("spm")
  (root / "corpus.txt").write_text("\n".join(TEXTS * 3), encoding="utf-8")
  for name, size in (("a", 300), ("b", 320)):
    spm.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"), model_prefix=str(root / name), vocab_size=size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2,
    )
  return root / "a.model", root / "b.model"


def run(inputs, output, **kwargs):
  kwargs = {"processes": 1, "shard_bytes": 1000, "progress": False, **kwargs}
  return prepare.prepare([str(p) for p in inputs], output, **kwargs)


def shard_files(output) -> dict[str, bytes]:
  """The shards and metadata of a prepared directory, by name."""
  return {
      p.name: p.read_bytes() for p in sorted(output.iterdir())
      if p.suffix == ".array_record" or p.name == sources.PREPARED_METADATA
  }


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece"])
def test_tokens_read_back_are_the_tokenizers_ids_of_each_jsonl_document(
    corpus, tmp_path, kind, sentencepiece_models
):
  model = str(sentencepiece_models[0]) if kind == "sentencepiece" else None
  result = run([corpus / "*.jsonl"], tmp_path / "out", tokenizer=kind, tokenizer_path=model)
  tok = data.make_tokenizer(kind, model)
  prepared = data.arrayrecord_source(str(tmp_path / "out"), tok, model)
  assert len(result["shards"]) > 2  # JSONL files cut into several shards at line boundaries
  assert len(prepared) == len(TEXTS) == result["documents"]
  for i, text in enumerate(TEXTS):
    np.testing.assert_array_equal(prepared[i], tok.encode(text))
    assert prepared[i].dtype == np.int32
  assert result["tokens"] == sum(len(tok.encode(t)) for t in TEXTS)
  assert result["dtype"] == "uint16" and result["tokenizer"]["kind"] == kind


def test_text_files_and_lingua_chunk_folders_read_back_as_the_files_source_reads_them(tmp_path):
  for i, text in enumerate(TEXTS[:5]):
    (tmp_path / "text" / "sub").mkdir(parents=True, exist_ok=True)
    (tmp_path / "text" / ("sub" if i % 2 else "") / f"{i}.txt").write_text(text, encoding="utf-8")
  (tmp_path / "text" / "blank.txt").write_text(" \n")  # no document, as for the files source
  for k in range(3):
    write_jsonl(tmp_path / "lingua" / "wiki" / f"wiki.chunk.{k:02d}.jsonl", TEXTS[k::3])
  write_jsonl(tmp_path / "lingua" / "wiki" / "wiki.val.jsonl", ["held out"])  # not a chunk
  tok = data.make_tokenizer("bytes")
  for name, files in [
      ("text", str(tmp_path / "text" / "**" / "*.txt")),
      ("lingua", str(tmp_path / "lingua" / "**" / "*.chunk.*.jsonl")),
  ]:
    run([tmp_path / name], tmp_path / f"{name}_out")  # a directory as the input
    prepared = data.arrayrecord_source(str(tmp_path / f"{name}_out"), tok)
    expected = data.file_source(files)
    assert len(prepared) == len(expected) == (5 if name == "text" else len(TEXTS))
    for i in range(len(expected)):
      np.testing.assert_array_equal(prepared[i], tok.encode(expected[i]))


def test_an_interrupted_preparation_resumes_to_the_same_files(corpus, tmp_path):
  out = tmp_path / "out"
  whole = run([corpus / "*.jsonl"], out)
  expected = shard_files(out)
  # Interrupted while writing shard 1: its file half written, its line not logged, no metadata.
  shard = out / whole["shards"][1]["file"]
  shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
  progress = out / prepare.PROGRESS_FILE
  lines = [ln for ln in progress.read_text().splitlines() if json.loads(ln)["shard"] != 1]
  progress.write_text("\n".join(lines) + '\n{"shard": 1, "fi')  # and a torn last append
  (out / sources.PREPARED_METADATA).unlink()
  again = run([corpus / "*.jsonl"], out)
  assert (again["written"], again["skipped"]) == (1, len(whole["shards"]) - 1)
  assert shard_files(out) == expected
  done = run([corpus / "*.jsonl"], out)  # nothing left to do
  assert (done["written"], done["skipped"]) == (0, len(whole["shards"]))


def test_parallel_processes_write_what_one_process_writes(corpus, tmp_path):
  serial = run([corpus / "*.jsonl"], tmp_path / "serial", processes=1)
  parallel = run([corpus / "*.jsonl"], tmp_path / "parallel", processes=2)
  assert serial["written"] == parallel["written"] > 2
  assert shard_files(tmp_path / "serial") == shard_files(tmp_path / "parallel")


def test_another_preparation_into_the_same_directory_is_refused(corpus, tmp_path):
  run([corpus / "a.jsonl"], tmp_path / "out")
  with pytest.raises(DataError, match="prepared from other inputs"):
    run([corpus / "*.jsonl"], tmp_path / "out")
  with pytest.raises(DataError, match="prepared from other .*text_key"):
    run([corpus / "a.jsonl"], tmp_path / "out", text_key="id")


def test_bad_inputs_name_the_file_and_line(tmp_path):
  good = [json.dumps({"text": f"line {i}"}) for i in range(40)]
  path = tmp_path / "bad.jsonl"
  path.write_text("\n".join(good + ['{"body": "no text"}']) + "\n")
  # Line 41 lies in a later shard than the first line: its number counts from the file's start.
  with pytest.raises(DataError, match=r"bad.jsonl:41: no key 'text' \(data.text_key\); found body"):
    run([path], tmp_path / "a", shard_bytes=100)
  path.write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
  with pytest.raises(DataError, match=r"bad.jsonl:2: invalid UTF-8 at byte 25"):
    run([path], tmp_path / "b")
  (tmp_path / "bad.txt").write_bytes(b"fine\n\xff")
  with pytest.raises(DataError, match=r"bad.txt: invalid UTF-8 at byte 5 \(line 2\)"):
    run([tmp_path / "bad.txt"], tmp_path / "c")
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(DataError, match="empty.jsonl' are empty"):
    run([tmp_path / "empty.jsonl"], tmp_path / "d")
  (tmp_path / "blank.jsonl").write_text("\n \n")
  with pytest.raises(DataError, match="hold no documents"):
    run([tmp_path / "blank.jsonl"], tmp_path / "e")
  assert not (tmp_path / "e" / sources.PREPARED_METADATA).exists()
  with pytest.raises(FileNotFoundError, match="input .*nothing-\\*.jsonl.*: no such file"):
    run([tmp_path / "nothing-*.jsonl"], tmp_path / "f")


def test_a_run_with_another_tokenizer_is_refused_by_field(corpus, tmp_path, sentencepiece_models):
  a, b = map(str, sentencepiece_models)
  run([corpus / "a.jsonl"], tmp_path / "sp", tokenizer="sentencepiece", tokenizer_path=a)
  with pytest.raises(ConfigError, match="tokenized with 'sentencepiece'.*is 'bytes'") as e:
    data.arrayrecord_source(str(tmp_path / "sp"), data.make_tokenizer("bytes"))
  assert e.value.field == "data.tokenizer"
  with pytest.raises(ConfigError, match="another sentencepiece model") as e:
    data.arrayrecord_source(str(tmp_path / "sp"), data.make_tokenizer("sentencepiece", b), b)
  assert e.value.field == "data.tokenizer_path"
  with pytest.raises(FileNotFoundError, match="data.path: no metadata.json"):
    data.arrayrecord_source(str(tmp_path), data.make_tokenizer("bytes"))


def test_prepared_batches_equal_the_files_source_batches_and_resume_exactly(corpus, tmp_path):
  run([corpus / "*.jsonl"], tmp_path / "out")
  tok = data.make_tokenizer("bytes")
  prepared = data.arrayrecord_source(str(tmp_path / "out"), tok)
  files = data.file_source(str(corpus / "*.jsonl"))
  kwargs = {"batch_size": 2, "seq_len": 16, "seed": 3, "prefetch": 0, "shard_index": 1,
            "shard_count": 2}

  def batches(source, n, state=None):
    with contextlib.closing(data.make_batches(source, tok, **kwargs)) as it:
      if state is not None:
        it.set_state(state)
      out = list(itertools.islice(it, n))
      return out, json.loads(json.dumps(it.get_state()))

  reference, _ = batches(files, 40)
  np.testing.assert_array_equal(batches(prepared, 40)[0], reference)
  for k in (0, 5, 33):
    _, state = batches(prepared, k)
    np.testing.assert_array_equal(batches(prepared, 7, state)[0], reference[k : k + 7])


def test_a_short_run_trains_on_prepared_shards_and_resumes_bitwise(corpus, tmp_path):
  run([corpus / "*.jsonl"], tmp_path / "train")
  run([corpus / "b.jsonl"], tmp_path / "eval")
  cfg = smoke_config(
      tmp_path / "tfds", "data.source=arrayrecord", f"data.path={tmp_path / 'train'}",
      f"data.eval_path={tmp_path / 'eval'}", "data.shards=2", "train.eval_every=3",
  )
  loop.run(cfg, tmp_path / "whole", log=lambda _: None)
  losses = logged(tmp_path / "whole", "train/loss")
  assert sorted(losses) == list(range(1, 7)) and all(0 < x < 10 for x in losses.values())
  assert logged(tmp_path / "whole", "eval/loss")
  loop.run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stop_after=4)),
           tmp_path / "parts", log=lambda _: None)
  loop.run(cfg, tmp_path / "parts", log=lambda _: None)
  assert logged(tmp_path / "parts", "train/loss") == losses


def test_the_config_needs_a_path_for_the_arrayrecord_source():
  with pytest.raises(ConfigError) as e:
    config_loading.load("tiny", ["data.source=arrayrecord"])
  assert e.value.field == "data.path"


def test_the_command_line_takes_the_tokenizer_as_a_run_config_names_it(corpus, tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "memjax.data.prepare", str(corpus / "*.jsonl"), "--output", str(out),
       "--processes", "2", "--shard-mb", "0.001", "--quiet", "data.tokenizer=bytes"],
      capture_output=True, text=True, timeout=120, check=False,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"prepared {len(TEXTS)} documents" in proc.stdout and "MB/s" in proc.stdout
  assert f"data.source=arrayrecord data.path={out}" in proc.stdout
  assert json.loads((out / "metadata.json").read_text())["documents"] == len(TEXTS)
  assert prepare.main([str(corpus / "a.jsonl"), "--output", str(out), "--quiet"]) == 2
  assert prepare.main([str(corpus), "--output", str(tmp_path / "x"), "data.tokenizer=nope"]) == 2
