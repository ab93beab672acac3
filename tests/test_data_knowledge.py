"""The knowledge corpus: determinism, unique names, biographies, probes, and its TFDS dataset."""

import pathlib
import re
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from memjax.data import knowledge


def test_people_are_the_same_on_every_machine():
  # A fixed expectation: a change of lists, draw order or numpy's stream shows up here.
  assert knowledge.make_people(1, 0)[0] == knowledge.Person(
      name="Xavier Rosenthal", birth_date="1 September 1970", birth_city="Bergen",
      university="Greymont University", major="physics", employer="Northwind Pharmaceuticals",
      employer_city="Lisbon",
  )
  assert knowledge.make_people(50, 3) == knowledge.make_people(50, 3)
  assert knowledge.make_people(50, 3) != knowledge.make_people(50, 4)
  assert knowledge.make_people(200, 1)[:50] == knowledge.make_people(50, 1)  # a prefix


def test_names_are_unique_past_the_first_last_combinations():
  n = len(knowledge.FIRST_NAMES) * len(knowledge.LAST_NAMES) + 500
  people = knowledge.make_people(n, 0)
  names = [p.name for p in people]
  assert len(set(names)) == n
  assert any(re.fullmatch(r"\w+ [A-Z]\. \w+", name) for name in names)  # middle initials
  with pytest.raises(ValueError, match="data.people"):
    knowledge.make_people(0, 0)


def test_facts_come_from_the_lists():
  for p in knowledge.make_people(300, 2):
    day, month, year = p.birth_date.split()
    assert 1 <= int(day) <= 31 and month in knowledge.MONTHS and 1940 <= int(year) <= 1999
    assert p.birth_city in knowledge.CITIES and p.employer_city in knowledge.CITIES
    assert p.university in knowledge.UNIVERSITIES and p.major in knowledge.MAJORS
    assert p.employer in knowledge.EMPLOYERS


def test_biographies_state_every_fact_in_a_shuffled_order_and_varied_words():
  people = knowledge.make_people(100, 0)
  probes = knowledge.probes(people)
  orders, phrasings = set(), {a: set() for a in knowledge.ATTRIBUTES}
  for i, (person, text) in enumerate(zip(people, knowledge.biographies(people, 0))):
    sentences = [p.prompt + p.answer + "." for p in probes[6 * i : 6 * i + 6]]
    positions = [text.index(s) for s in sentences]  # each sentence appears whole...
    assert len(text) == sum(map(len, sentences)) + len(sentences) - 1  # ...and nothing else
    orders.add(tuple(np.argsort(positions)))
    for p in probes[6 * i : 6 * i + 6]:
      phrasings[p.attribute].add(p.prompt.replace(person.name, "NAME"))
  assert len(orders) > 50  # the order differs between people
  assert all(len(phrasings[a]) == len(knowledge.TEMPLATES[a]) >= 3 for a in knowledge.ATTRIBUTES)
  same = [knowledge.biography(people[0], np.random.default_rng(7)) for _ in range(2)]
  assert same[0] == same[1]


def test_probe_and_answer_complete_a_sentence_of_the_biography():
  people = knowledge.make_people(40, 5)
  probes = knowledge.probes(people)
  assert len(probes) == 6 * len(people)
  assert [p.attribute for p in probes[:6]] == list(knowledge.ATTRIBUTES)
  texts = [text for text in knowledge.biographies(people, 5) for _ in knowledge.ATTRIBUTES]
  for probe, text in zip(probes, texts):
    assert probe.answer.startswith(" ") and not probe.prompt.endswith(" ")
    assert probe.name in probe.prompt
    assert probe.prompt + probe.answer + "." in text  # the words the biography used
  assert len({p.prompt for p in probes}) == len(probes)


def test_chance_levels():
  assert knowledge.chance_level("birth_city") == 1 / len(knowledge.CITIES)
  assert knowledge.chance_level("employer") == 1 / len(knowledge.EMPLOYERS)
  assert knowledge.chance_level("birth_date") == 1 / (365 * 60 + 15)  # 1940..1999, 15 leap days
  with pytest.raises(ValueError, match="attribute must be one of"):
    knowledge.chance_level("height")


def test_tfds_dataset_holds_the_corpus_and_reads_without_tensorflow(data_dir):
  path = knowledge.build_knowledge_dataset(12, 3, data_dir)
  assert path == data_dir / "memjax_knowledge" / "n12_seed3" / "1.0.0"
  people = knowledge.make_people(12, 3)
  train = tfds.data_source(knowledge.dataset_name(12, 3), split="train", data_dir=data_dir)
  assert [train[i]["text"].decode() for i in range(12)] == knowledge.biographies(people, 3)
  probe = tfds.data_source(knowledge.dataset_name(12, 3), split="probe", data_dir=data_dir)
  got = [{k: probe[i][k].decode() for k in ("name", "attribute", "prompt", "answer")}
         for i in range(len(probe))]
  assert got == [vars(p) for p in knowledge.probes(people)]
  assert "tensorflow" not in sys.modules
  assert not [p for p in data_dir.rglob("*") if "incomplete" in p.name]


def test_build_is_idempotent_and_sizes_have_their_own_directories(data_dir):
  first = knowledge.build_knowledge_dataset(5, 0, data_dir)
  stamp = {p: p.stat().st_mtime_ns for p in pathlib.Path(first).iterdir()}
  assert knowledge.build_knowledge_dataset(5, 0, data_dir) == first
  assert {p: p.stat().st_mtime_ns for p in pathlib.Path(first).iterdir()} == stamp  # untouched
  other = knowledge.build_knowledge_dataset(6, 0, data_dir)
  assert other != first and other.is_dir()


def test_a_failed_build_leaves_nothing_to_read(data_dir, monkeypatch):
  def fail(people, seed):
    raise RuntimeError("interrupted")

  monkeypatch.setattr(knowledge, "biographies", fail)
  with pytest.raises(RuntimeError, match="interrupted"):
    knowledge.build_knowledge_dataset(4, 9, data_dir)
  variant = data_dir / "memjax_knowledge" / "n4_seed9"
  assert not list(variant.rglob("*.json")) and not list(variant.rglob("*.array_record*"))
  monkeypatch.undo()
  path = knowledge.build_knowledge_dataset(4, 9, data_dir)
  assert len(tfds.data_source(knowledge.dataset_name(4, 9), split="train", data_dir=data_dir)) == 4
  assert path.is_dir()


def test_a_build_that_loses_a_race_uses_the_winners_dataset(data_dir, monkeypatch):
  path = knowledge.build_knowledge_dataset(3, 1, data_dir)

  def rename_fails(self, **kwargs):  # what the second of two racing renames sees
    raise OSError("Directory not empty")

  monkeypatch.setattr(knowledge.MemjaxKnowledge, "download_and_prepare", rename_fails)
  assert knowledge.build_knowledge_dataset(3, 1, data_dir) == path
  with pytest.raises(OSError, match="not empty"):  # no dataset there: the error stands
    knowledge.build_knowledge_dataset(3, 2, data_dir)


def test_probe_ids_split_the_sentence_as_the_biography_is_tokenized(tmp_path):
  import sentencepiece as spm

  from memjax.data import tokenizers

  people = knowledge.make_people(20, 0)
  (tmp_path / "bios.txt").write_text("\n".join(knowledge.biographies(people, 0)))
  # Spaces kept as they are, as in Llama 2's model: " Lisbon" alone would gain a "▁" piece.
  spm.SentencePieceTrainer.train(
      input=str(tmp_path / "bios.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=200,
      model_type="bpe", remove_extra_whitespaces=False, minloglevel=2,
  )
  for tok in (tokenizers.ByteTokenizer(), tokenizers.SentencePieceTokenizer(tmp_path / "sp.model")):
    for probe in knowledge.probes(people[:3]):
      prompt, answer = knowledge.probe_ids(probe, tok)
      assert prompt + answer == tok.encode(probe.prompt + probe.answer)
      assert prompt == tok.encode(probe.prompt)
      assert tok.decode(answer).strip() == probe.answer.strip()
  probe = knowledge.probes(people[:1])[0]
  assert knowledge.probe_ids(probe, tok)[1] != tok.encode(probe.answer)  # why probe_ids exists
