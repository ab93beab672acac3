"""The grain pipeline: packing keeps every token once, exact resume, shards, seeds, eval, TFDS."""

import contextlib
import itertools
import json

import numpy as np
import pytest

from memjax.data import knowledge, pipeline, sources
from memjax.data.sources import DataError
from memjax.data.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
# Distinct documents of 8 to 56 bytes: some fit in a row several times, some span rows.
DOCS = [f"doc {i:02d} " + "abcdefghijklm"[: i % 13] * (1 + i % 4) for i in range(40)]


def batches(source=DOCS, n=None, tokenizer=TOK, **kwargs):
  """The first n batches (all when n is None) of a fresh make_batches iterator."""
  kwargs = {"batch_size": 1, "seq_len": 16, "seed": 0, "prefetch": 0, **kwargs}
  with contextlib.closing(pipeline.make_batches(source, tokenizer, **kwargs)) as it:
    return list(itertools.islice(it, n))


def stream(rows, seq_len):
  """The token stream that rows of seq_len + 1 tokens overlapping by one token cut."""
  rows = [row for batch in rows for row in batch]
  assert all(len(row) == seq_len + 1 for row in rows)
  for a, b in zip(rows, rows[1:]):
    assert a[-1] == b[0]  # the documented overlap
  return np.concatenate([row[:-1] for row in rows] + [rows[-1][-1:]])


def frames(tokens, tokenizer=TOK):
  """(the documents framed as BOS doc EOS in `tokens`, the unfinished frame at the end)."""
  docs, i = [], 0
  while i < len(tokens):
    assert tokens[i] == tokenizer.bos_id, f"token {i} should open a document"
    ends = np.flatnonzero(tokens[i:] == tokenizer.eos_id)
    if not len(ends):
      return docs, tokens[i:]
    docs.append(tokenizer.decode(tokens[i + 1 : i + ends[0]]))
    i += ends[0] + 1
  return docs, tokens[:0]


def check_all_but_a_short_tail(docs, partial, expected, max_dropped, tokenizer=TOK):
  """Each expected document once, but for the run's last tokens, fewer than `max_dropped`.

  A finite run drops fewer than seq_len tokens that do not complete a row, and with them fewer
  than batch_size - 1 rows that do not complete a batch: under batch_size * seq_len in all.
  """
  assert len(docs) == len(set(docs)) and set(docs) <= set(expected)
  missing = [d for d in expected if d not in docs]
  dropped = sum(len(tokenizer.encode(d)) + 2 for d in missing) - len(partial)
  assert 0 <= dropped < max_dropped
  if len(partial):
    framed = [[tokenizer.bos_id, *tokenizer.encode(d), tokenizer.eos_id] for d in missing]
    assert any(f[: len(partial)] == list(partial) for f in framed)


def test_batches_are_int32_rows_of_seq_len_plus_one():
  (batch,) = batches(n=1, batch_size=4, seq_len=16)
  assert batch.dtype == np.int32 and batch.shape == (4, 17)


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
def test_packing_keeps_every_token_once_in_order(seq_len):
  rows = batches(seq_len=seq_len, num_epochs=1)
  docs, partial = frames(stream(rows, seq_len))
  check_all_but_a_short_tail(docs, partial, DOCS, seq_len)
  assert docs != DOCS[: len(docs)]  # shuffled


def test_every_epoch_holds_every_document_in_a_new_order():
  docs, partial = frames(stream(batches(num_epochs=3, batch_size=2), 16))
  epochs = [docs[i : i + len(DOCS)] for i in range(0, 3 * len(DOCS), len(DOCS))]
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(DOCS)
  assert epochs[0] != epochs[1]
  check_all_but_a_short_tail(epochs[2], partial, DOCS, 2 * 16)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resuming_from_a_saved_state_continues_exactly(prefetch):
  kwargs = {"batch_size": 2, "seq_len": 16, "seed": 3, "prefetch": prefetch}
  reference = batches(n=60, **kwargs)  # ~43 batches an epoch: the later resumes cross one
  for k in (0, 1, 7, 44):
    with contextlib.closing(pipeline.make_batches(DOCS, TOK, **kwargs)) as it:
      seen = list(itertools.islice(it, k))
      state = json.loads(json.dumps(it.get_state()))  # saved as a checkpoint would
      after = list(itertools.islice(it, 6))
    with contextlib.closing(pipeline.make_batches(DOCS, TOK, **kwargs)) as resumed:
      resumed.set_state(state)
      restored = list(itertools.islice(resumed, 6))
    np.testing.assert_array_equal(np.array(seen + after), reference[: k + 6])
    np.testing.assert_array_equal(np.array(restored), reference[k : k + 6])


def test_a_state_of_another_seq_len_is_refused():
  with contextlib.closing(pipeline.make_batches(DOCS, TOK, batch_size=1, seq_len=8, seed=0)) as it:
    next(it)
    state = it.get_state()
  with contextlib.closing(pipeline.make_batches(DOCS, TOK, batch_size=1, seq_len=9, seed=0)) as it:
    with pytest.raises(DataError, match="seq_len=8.*seq_len=9"):
      it.set_state(state)


def test_shards_are_disjoint_and_together_complete():
  n_shards, seq_len = 3, 8
  seen = []
  for i in range(n_shards):
    rows = batches(seq_len=seq_len, num_epochs=1, shard_index=i, shard_count=n_shards)
    docs, partial = frames(stream(rows, seq_len))
    check_all_but_a_short_tail(docs, partial, DOCS[i::n_shards], seq_len)
    seen.append(set(docs))
  assert all(not (a & b) for a, b in itertools.combinations(seen, 2))


def test_the_seed_decides_the_order():
  same = [batches(n=5, batch_size=4, seed=11) for _ in range(2)]
  np.testing.assert_array_equal(same[0], same[1])
  assert not np.array_equal(same[0], batches(n=5, batch_size=4, seed=12))


def test_eval_batches_are_fixed_unshuffled_and_sized():
  full = pipeline.eval_batches(DOCS, TOK, batch_size=2, seq_len=16)
  docs, partial = frames(stream(full, 16))
  assert docs == DOCS[: len(docs)]  # in source order
  check_all_but_a_short_tail(docs, partial, DOCS, 2 * 16)
  first = pipeline.eval_batches(DOCS, TOK, batch_size=2, seq_len=16, num_batches=3)
  np.testing.assert_array_equal(first, full[:3])
  with pytest.raises(DataError, match=f"makes {len(full)} batches of 2 x 17 tokens; 999 needed"):
    pipeline.eval_batches(DOCS, TOK, batch_size=2, seq_len=16, num_batches=999)


class ShiftedBytes:
  """A tokenizer whose specials are 0 and 1: the pipeline takes BOS and EOS from the tokenizer."""

  name, vocab_size, bos_id, eos_id = "shifted", 258, 0, 1

  def encode(self, text):
    return [b + 2 for b in text.encode()]

  def decode(self, ids):
    return bytes(i - 2 for i in ids if i > 1).decode()


def test_any_tokenizer_frames_documents_with_its_own_specials():
  tok = ShiftedBytes()
  rows = batches(tokenizer=tok, num_epochs=1)
  docs, partial = frames(stream(rows, 16), tok)
  check_all_but_a_short_tail(docs, partial, DOCS, 16, tok)


def test_a_tfds_dataset_flows_through(tmp_path):
  knowledge.build_knowledge_dataset(6, 0, tmp_path)
  source = sources.tfds_source(knowledge.dataset_name(6, 0), "train", str(tmp_path))
  rows = batches(source, batch_size=2, seq_len=32, num_epochs=1, prefetch=1)
  docs, partial = frames(stream(rows, 32))
  expected = knowledge.biographies(knowledge.make_people(6, 0), 0)
  check_all_but_a_short_tail(docs, partial, expected, 2 * 32)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match=r"shard_index: must be in \[0, 2\)"):
    batches(shard_index=2, shard_count=2)
  with pytest.raises(DataError, match="fewer documents than processes"):
    batches(["one", "two"], shard_count=3)
  with pytest.raises(ValueError, match="batch_size: must be >= 1"):
    batches(batch_size=0)
  with pytest.raises(ValueError, match="num_epochs: must be None or >= 1"):
    batches(num_epochs=0)
