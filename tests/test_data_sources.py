"""Document sources: text and JSONL files, TFDS datasets, held-out splits, and their errors."""

import json

import pytest

from memjax.data import knowledge, sources
from memjax.data.sources import DataError


def write(path, data):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data if isinstance(data, bytes) else data.encode())
  return path


def test_text_files_are_one_document_each_in_path_order(tmp_path):
  write(tmp_path / "b.md", "# Beta\n")
  write(tmp_path / "a.txt", "alpha — ünïcode\n")
  write(tmp_path / "sub" / "c.txt", "gamma")
  docs = sources.file_source(str(tmp_path / "**" / "*"))
  assert [docs[i] for i in range(len(docs))] == ["alpha — ünïcode\n", "# Beta\n", "gamma"]
  both = sources.file_source([str(tmp_path / "*.md"), str(tmp_path / "sub" / "*.txt")])
  assert [both[i] for i in range(len(both))] == ["# Beta\n", "gamma"]


def test_jsonl_is_one_document_per_line(tmp_path):
  records = [{"text": "first"}, {"text": "zweite — ü", "id": 2}, {"text": ""}]
  write(tmp_path / "d.jsonl", "\n".join(map(json.dumps, records)) + "\n\n")  # blank tail
  write(tmp_path / "e.jsonl", json.dumps({"body": "other key"}) + "\n")
  docs = sources.file_source(str(tmp_path / "d.jsonl"))
  assert [docs[i] for i in range(len(docs))] == ["first", "zweite — ü", ""]
  body = sources.file_source(str(tmp_path / "e.jsonl"), text_key="body")
  assert body[0] == "other key"


def test_no_matching_file_names_the_field_and_pattern(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"data.path: no file matches .*nothing-\*\.txt"):
    sources.file_source(str(tmp_path / "nothing-*.txt"))


def test_files_without_documents_are_an_error(tmp_path):
  write(tmp_path / "empty.jsonl", "\n")
  with pytest.raises(DataError, match="are empty"):
    sources.file_source(str(tmp_path / "*.jsonl"))


def test_invalid_utf8_names_the_file_and_byte(tmp_path):
  write(tmp_path / "bad.txt", b"line one\nok \xff here")
  with pytest.raises(DataError, match=r"bad.txt: invalid UTF-8 at byte 12 \(line 2\)"):
    sources.file_source(str(tmp_path / "bad.txt"))
  write(tmp_path / "bad.jsonl", b'{"text": "ok"}\n{"text": "\xc3("}\n')
  with pytest.raises(DataError, match=r"bad.jsonl:2: invalid UTF-8 at byte 25"):
    sources.file_source(str(tmp_path / "bad.jsonl"))


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"txt": "x"}', r"bad.jsonl:2: no key 'text' \(data.text_key\); found txt"),
        ("not json", r"bad.jsonl:2: not a JSON object"),
        ('["text"]', r"bad.jsonl:2: no key 'text'.*found list"),
        ('{"text": 3}', r"bad.jsonl:2: 'text' must be a string, got int"),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
  write(tmp_path / "bad.jsonl", '{"text": "fine"}\n' + line + "\n")
  with pytest.raises(DataError, match=message):
    sources.file_source(str(tmp_path / "bad.jsonl"))


def test_split_heldout(tmp_path):
  docs = [f"doc {i}" for i in range(10)]
  train, heldout = sources.split_heldout(docs, 3)
  assert [train[i] for i in range(len(train))] == docs[:7]
  assert [heldout[i] for i in range(len(heldout))] == docs[7:]
  with pytest.raises(IndexError):
    heldout[3]
  with pytest.raises(ValueError, match=r"n_heldout: must be in \[1, 10\)"):
    sources.split_heldout(docs, 10)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  knowledge.build_knowledge_dataset(10, 0, data_dir)
  return str(data_dir)


def test_tfds_source_reads_a_prepared_dataset(data_dir):
  name = knowledge.dataset_name(10, 0)
  docs = sources.tfds_source(name, "train", data_dir)
  expected = knowledge.biographies(knowledge.make_people(10, 0), 0)
  assert [docs[i] for i in range(len(docs))] == expected
  tail = sources.tfds_source(name, "train[80%:]", data_dir)  # a held-out slice
  assert [tail[i] for i in range(len(tail))] == expected[8:]
  prompts = sources.tfds_source(name, "probe", data_dir, text_key="prompt")
  assert len(prompts) == 60
  assert prompts[0] == knowledge.probes(knowledge.make_people(1, 0))[0].prompt


def test_tfds_source_errors_name_dataset_split_and_field(data_dir, tmp_path):
  name = knowledge.dataset_name(10, 0)
  with pytest.raises(FileNotFoundError, match="'no_such_dataset' .*: no such dataset"):
    sources.tfds_source("no_such_dataset", "train", data_dir)
  with pytest.raises(FileNotFoundError, match="not prepared"):
    sources.tfds_source(knowledge.dataset_name(11, 0), "train", data_dir)
  with pytest.raises(FileNotFoundError, match=f"data.data_dir={tmp_path}"):
    sources.tfds_source(name, "train", str(tmp_path))
  with pytest.raises(DataError, match="split 'validation'.*Unknown split"):
    sources.tfds_source(name, "validation", data_dir)
  with pytest.raises(DataError, match="holds no examples"):
    sources.tfds_source(name, "train[:0]", data_dir)
  with pytest.raises(DataError, match="data.text_key: .* no feature 'body'; it has answer"):
    sources.tfds_source(name, "train", data_dir, text_key="body")


def test_a_files_index_is_cached_until_the_file_changes(tmp_path, monkeypatch):
  monkeypatch.setenv("MEMJAX_CACHE_DIR", str(tmp_path / "cache"))
  path = write(tmp_path / "d.jsonl", '{"text": "one"}\n\n{"text": "two"}\n')
  assert [sources.file_source(str(path))[i] for i in range(2)] == ["one", "two"]
  assert len(list((tmp_path / "cache" / "file_index").iterdir())) == 1

  def no_parsing(*args):
    raise AssertionError("indexed again")

  with monkeypatch.context() as m:  # a restart reads the index: no line is parsed
    m.setattr(sources, "_index_file", no_parsing)
    docs = sources.file_source(str(path))
    assert [docs[i] for i in range(len(docs))] == ["one", "two"]
  # Another text key or another version of the file is indexed (and checked) again.
  with pytest.raises(DataError, match="no key 'body'"):
    sources.file_source(str(path), text_key="body")
  write(path, '{"text": "one"}\n{"text": "2"}\n{"text": "three"}\n')
  docs = sources.file_source(str(path))
  assert [docs[i] for i in range(len(docs))] == ["one", "2", "three"]
