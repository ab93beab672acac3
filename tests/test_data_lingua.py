"""Lingua's data layout as a memjax source: `root_dir/<name>/*.chunk.*.jsonl`, mixed by weight."""

import dataclasses
import json

import numpy as np
import pytest

from memjax import config, config_loading, data
from memjax.config import ConfigError
from memjax.training import loop

from support.training import logged, smoke_config

SOURCES = {"arxiv": (2, 30), "wiki": (3, 25)}  # name -> (chunk files, documents per file)
BOS, EOS = 256, 257  # the byte tokenizer's


def write_root(root) -> set[str]:
  """A Lingua root_dir of two sources in `root`; returns every document's text."""
  texts = set()
  for name, (n_chunks, n_docs) in SOURCES.items():
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "README").write_text("not a chunk")  # only *.chunk.*.jsonl files are read
    for k in range(n_chunks):
      lines = [f"{name} chunk {k} doc {i}." for i in range(n_docs)]
      texts.update(lines)
      records = [json.dumps({"text": t, "id": i}) for i, t in enumerate(lines)]
      (folder / f"{name}.chunk.{k:02d}.jsonl").write_text("\n".join(records) + "\n")
  return texts


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("lingua")
  return root, write_root(root)


def stream(batches) -> np.ndarray:
  """The token stream the packed rows tile (consecutive rows overlap by one token)."""
  return np.concatenate([row[:-1] for batch in batches for row in batch])


def documents(tokens: np.ndarray) -> list[str]:
  """The whole documents (BOS text EOS) of a token stream, less the cut ones at either end."""
  ends = np.flatnonzero(tokens == EOS)
  return [bytes(tokens[a + 2 : b].tolist()).decode() for a, b in zip(ends[:-1], ends[1:])]


def batches(source, n, **kwargs):
  it = data.make_batches(
      source, data.make_tokenizer("bytes"), batch_size=4, seq_len=32, seed=0, prefetch=0, **kwargs
  )
  return [next(it) for _ in range(n)]


def test_documents_come_from_the_chunk_files_in_proportion_to_the_weights(root):
  root_dir, texts = root
  source = data.lingua_source(str(root_dir), {"arxiv": 3.0, "wiki": 1.0})
  assert len(source) == 2 * 30 + 3 * 25
  docs = documents(stream(batches(source, 60)))
  assert len(docs) > 200 and set(docs) <= texts
  share = sum(d.startswith("arxiv") for d in docs) / len(docs)
  assert 0.7 < share < 0.8, share
  assert {d.split(" doc")[0] for d in docs} == {  # every chunk file is read
      f"{name} chunk {k}" for name, (n_chunks, _) in SOURCES.items() for k in range(n_chunks)
  }


def test_add_bos_and_add_eos_off_leave_the_documents_unframed(root):
  source = data.lingua_source(str(root[0]), {"arxiv": 1.0, "wiki": 1.0})
  tokens = stream(batches(source, 4, add_bos=False, add_eos=False))
  assert not np.isin(tokens, [BOS, EOS]).any()
  only_bos = stream(batches(source, 4, add_eos=False))
  assert (only_bos == BOS).any() and not (only_bos == EOS).any()


def test_a_resumed_iterator_continues_with_the_same_batches(root):
  source = data.lingua_source(str(root[0]), {"arxiv": 2.0, "wiki": 1.0})
  make = lambda: data.make_batches(
      source, data.make_tokenizer("bytes"), batch_size=4, seq_len=32, seed=3, shard_index=1,
      shard_count=2,
  )
  whole = make()
  expected = [next(whole) for _ in range(12)]
  first = make()
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
  resumed = make()
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack([next(resumed) for _ in range(7)]), expected[5:])


def test_the_two_shards_read_disjoint_documents(root):
  source = data.lingua_source(str(root[0]), {"arxiv": 1.0, "wiki": 1.0})
  seen = [
      set(documents(stream(batches(source, 8, shard_index=i, shard_count=2)))) for i in (0, 1)
  ]
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_the_config_reads_sources_as_a_mapping_of_weights(tmp_path):
  cfg = config_loading.load("tiny", [
      "data.source=lingua", f"data.root_dir={tmp_path}", "data.sources={arxiv: 3, wiki: 0.5}",
  ])
  assert cfg.data.sources == {"arxiv": 3.0, "wiki": 0.5}
  assert config.from_dict(config.Config, config.to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["data.source=lingua", "data.sources={a: 1}"], "data.root_dir"),
        (["data.source=lingua", "data.root_dir=/x"], "data.sources"),
        (["data.source=lingua", "data.root_dir=/x", "data.sources={a: 1, b: 0}"], "data.sources.b"),
        (["data.sources={a: -1}"], "data.sources.a"),
        (["data.sources={a: heavy}"], "data.sources.a"),
        (["data.sources=[a, b]"], "data.sources"),
    ],
)
def test_a_bad_lingua_config_names_the_field(overrides, field):
  with pytest.raises(ConfigError) as e:
    config_loading.load("tiny", overrides)
  assert e.value.field == field


def test_a_missing_root_dir_an_empty_source_folder_and_a_bad_weight_name_field_and_path(tmp_path):
  with pytest.raises(ConfigError, match="no such directory") as e:
    data.lingua_source(str(tmp_path / "nowhere"), {"a": 1.0})
  assert e.value.field == "data.root_dir" and str(tmp_path / "nowhere") in str(e.value)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.jsonl").write_text('{"text": "not a chunk"}\n')
  for name in ("empty", "absent"):
    with pytest.raises(ConfigError, match="no chunk files") as e:
      data.lingua_source(str(tmp_path), {name: 1.0})
    assert e.value.field == f"data.sources.{name}" and str(tmp_path / name) in str(e.value)
  with pytest.raises(ConfigError, match="weight > 0") as e:
    data.lingua_source(str(tmp_path), {"empty": 0.0})
  assert e.value.field == "data.sources.empty"


def test_a_short_run_trains_on_the_sources_and_resumes_bitwise(tmp_path, root):
  cfg = smoke_config(
      tmp_path / "tfds", "data.source=lingua", f"data.root_dir={root[0]}",
      "data.sources={arxiv: 2, wiki: 1}", "data.shards=2", "train.eval_every=100",
  )
  loop.run(cfg, tmp_path / "whole", log=lambda _: None)
  losses = logged(tmp_path / "whole", "train/loss")
  assert sorted(losses) == list(range(1, 7)) and all(0 < x < 10 for x in losses.values())
  loop.run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stop_after=4)),
           tmp_path / "parts", log=lambda _: None)
  assert sorted(logged(tmp_path / "parts", "train/loss")) == [1, 2, 3, 4]
  loop.run(cfg, tmp_path / "parts", log=lambda _: None)
  assert logged(tmp_path / "parts", "train/loss") == losses
