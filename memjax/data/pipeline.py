"""Packed token batches with grain: `make_batches` for training, `eval_batches` for eval loss.

    documents (a source) -> this process's shard -> shuffled per epoch -> repeated
      -> tokenized (unless prepared), framed as BOS doc EOS -> packed into rows
      -> batches (B, T+1) int32

Mixtures. A `Mixture`'s sources each go through shard, shuffle and repeat on their own (each
from its own seed) and are then interleaved by `grain.MapDataset.mix` in proportion to their
weights, before tokenizing; the mixed dataset is indexable, so it resumes like one source.

Packing. The framed documents, in the shuffled order, form one token stream s. With T = seq_len,
row r is s[r*T : r*T + T + 1]: consecutive rows overlap by one token (the last token of a row is
the first of the next). A row is both the inputs (row[:-1]) and the next-token targets (row[1:]),
so the inputs of consecutive rows tile the stream with no gap and no repeat, and every token but
the stream's first is a target exactly once; no target is lost at row boundaries. Document
boundaries fall anywhere in a row and a long document spans rows. A finite run (`num_epochs`)
drops the stream's last tokens that do not complete a row (fewer than T) and a last partial batch.

Resuming. The iterator's `get_state()` is a small JSON-serialisable dict (the grain state of the
document reader plus an offset into the current document); `set_state` on a fresh iterator of
the same pipeline continues with exactly the batches the saved one would have produced next.

Sharding. Shard `shard_index` of `shard_count` reads documents shard_index, shard_index +
shard_count, ...: the shards are disjoint and together hold every document. Each shuffles its own
documents, anew each epoch, from `seed`. A global batch takes an equal block of rows from every
shard, in shard order; a process reads the shards of its block of rows side by side
(`ShardGroup`), so the global batches depend on the shard count only, not on how many processes
share the shards.
"""

from __future__ import annotations

import functools
import itertools
import zlib
from typing import Any, Sequence

import grain
import numpy as np

from memjax.data.sources import DataError, DocumentSource, Mixture
from memjax.data.tokenizers import Tokenizer

# Documents are read and tokenized by a few threads ahead of the packer. Tokenizers hold the GIL
# for part of their work, so more threads than this buy nothing on small hosts.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=256)


def _frame(
    tokenizer: Tokenizer, add_bos: bool, add_eos: bool, doc: str | np.ndarray
) -> np.ndarray:
  # Prepared sources hold token ids already (`arrayrecord_source`); others hold text.
  ids = doc if isinstance(doc, np.ndarray) else tokenizer.encode(doc)
  bos = np.full(int(add_bos), tokenizer.bos_id, np.int32)
  eos = np.full(int(add_eos), tokenizer.eos_id, np.int32)
  return np.concatenate([bos, np.asarray(ids, np.int32), eos])


class _PackedRowsIterator(grain.DatasetIterator):
  """Cuts the concatenated documents of `parent` into rows of T+1 tokens at a stride of T."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len
    # The next row starts at token `_offset` of `_doc`, which `_parent` yields from `_doc_state`.
    # `_doc` is None when the next row starts at the parent's next document.
    self._doc: np.ndarray | None = None
    self._doc_state = parent.get_state()
    self._offset = 0

  def __next__(self) -> np.ndarray:
    pieces, need = [], self._seq_len + 1
    doc, doc_state, offset = self._doc, self._doc_state, self._offset
    while need:
      if doc is None or offset == len(doc):
        doc_state = self._parent.get_state()
        doc, offset = next(self._parent), 0  # StopIteration: the rest is shorter than a row
      take = min(need, len(doc) - offset)
      pieces.append(doc[offset : offset + take])
      offset, need = offset + take, need - take
    # The row's last token opens the next row; it lies in `doc`, as `take` >= 1.
    self._doc, self._doc_state, self._offset = doc, doc_state, offset - 1
    return np.concatenate(pieces)

  def get_state(self) -> dict[str, Any]:
    return {"seq_len": self._seq_len, "parent": self._doc_state, "offset": self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    if state["seq_len"] != self._seq_len:
      raise DataError(
          f"the saved data state packs rows of seq_len={state['seq_len']}, this run uses "
          f"seq_len={self._seq_len}: resume with the same train.seq_len"
      )
    self._parent.set_state(state["parent"])
    self._doc_state, self._offset = state["parent"], state["offset"]
    # An offset inside a document needs that document now; offset 0 is its start, as after None.
    self._doc = next(self._parent) if self._offset else None


class _PackedRows(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len

  def __iter__(self) -> _PackedRowsIterator:
    return _PackedRowsIterator(self._parent.__iter__(), self._seq_len)


def _describe(source: DocumentSource) -> str:
  text = repr(source)  # memjax's sources say where they read; a plain list would print itself
  return text if len(text) <= 200 else f"{type(source).__name__} of {len(source)} documents"


def _check(ok: bool, name: str, message: str) -> None:
  if not ok:
    raise ValueError(f"{name}: {message}")


def _documents(
    source: DocumentSource, seed: int | None, shard_index: int, shard_count: int,
    num_epochs: int | None,
) -> grain.MapDataset:
  """This shard's documents of one source, shuffled from `seed`, repeated `num_epochs` times."""
  if len(source) < shard_count:
    raise DataError(f"{_describe(source)}: fewer documents than processes ({shard_count})")
  docs = grain.MapDataset.source(source)[shard_index::shard_count]
  if seed is not None:
    # grain seeds epoch e with seed + e; a hashed seed keeps run s's epoch 1 from being run
    # s+1's epoch 0.
    docs = docs.shuffle(seed=int(np.random.SeedSequence(seed).generate_state(1)[0]))
  return docs.repeat(num_epochs)


def _rows(
    source: DocumentSource | Mixture,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    seed: int | None,
    shard_index: int,
    shard_count: int,
    num_epochs: int | None,
    add_bos: bool = True,
    add_eos: bool = True,
) -> grain.IterDataset:
  """Packed rows of this shard's documents, shuffled from `seed` (None: in source order)."""
  _check(seq_len >= 1, "seq_len", f"must be >= 1, got {seq_len}")
  _check(shard_count >= 1, "shard_count", f"must be >= 1, got {shard_count}")
  _check(
      0 <= shard_index < shard_count,
      "shard_index",
      f"must be in [0, {shard_count}), got {shard_index}",
  )
  _check(
      num_epochs is None or num_epochs >= 1, "num_epochs", f"must be None or >= 1, got {num_epochs}"
  )
  _check(seed is None or seed >= 0, "seed", f"must be >= 0, got {seed}")
  if isinstance(source, Mixture):
    # Each source is shuffled from the run's seed and its name: adding a source leaves the
    # others' orders as they were.
    parts = [
        _documents(
            part, None if seed is None else [seed, zlib.crc32(name.encode())], shard_index,
            shard_count, num_epochs,
        )
        for name, part in source.parts.items()
    ]
    docs = grain.MapDataset.mix(parts, list(source.weights.values()))
  else:
    docs = _documents(source, seed, shard_index, shard_count, num_epochs)
  docs = docs.map(functools.partial(_frame, tokenizer, add_bos, add_eos))
  return _PackedRows(docs.to_iter_dataset(_READ_OPTIONS), seq_len)


def make_batches(
    source: DocumentSource,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    prefetch: int = 2,
    add_bos: bool = True,
    add_eos: bool = True,
) -> grain.DatasetIterator:
  """Training batches: `next()` gives an int32 array (batch_size, seq_len + 1) of packed rows.

  Endless unless `num_epochs` is given. `batch_size` is this process's share of the global
  batch. `prefetch` batches are prepared ahead in a background thread (0: none). The iterator
  has `get_state()` / `set_state(state)`; see the module docstring for packing and resuming.
  `source` may be a `Mixture`; `add_bos` / `add_eos` frame each document with BOS / EOS.
  """
  _check(batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}")
  _check(prefetch >= 0, "prefetch", f"must be >= 0, got {prefetch}")
  rows = _rows(
      source, tokenizer, seq_len=seq_len, seed=seed, shard_index=shard_index,
      shard_count=shard_count, num_epochs=num_epochs, add_bos=add_bos, add_eos=add_eos,
  )
  batches = rows.batch(batch_size, drop_remainder=True)
  if prefetch:
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
  return iter(batches)


class ShardGroup:
  """Several shards' batch iterators read side by side: each batch stacks one batch of each.

  Its state holds every shard's iterator state by shard id, so that a checkpoint can store each
  shard on its own and a run with another split of the same shards over processes can resume.
  """

  def __init__(self, iterators: dict[int, grain.DatasetIterator], shard_count: int):
    if not iterators or not all(0 <= i < shard_count for i in iterators):
      raise ValueError(f"shard ids must be in [0, {shard_count}), got {sorted(iterators)}")
    self._iterators = dict(sorted(iterators.items()))
    self.shard_count = shard_count

  @property
  def shard_ids(self) -> tuple[int, ...]:
    return tuple(self._iterators)

  def __iter__(self) -> ShardGroup:
    return self

  def __next__(self) -> np.ndarray:
    return np.concatenate([next(it) for it in self._iterators.values()])

  def get_state(self) -> dict[str, Any]:
    return {
        "shard_count": self.shard_count,
        "shards": {str(i): it.get_state() for i, it in self._iterators.items()},
    }

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("shard_count") != self.shard_count:
      raise DataError(
          f"the saved data state splits the data into {state.get('shard_count')} shards, this run "
          f"into {self.shard_count}: set data.shards={state.get('shard_count')} to continue the "
          "saved order"
      )
    missing = [i for i in self._iterators if str(i) not in state["shards"]]
    if missing:
      raise DataError(f"the saved data state lacks shards {missing}")
    for i, it in self._iterators.items():
      it.set_state(state["shards"][str(i)])

  def close(self) -> None:
    for it in self._iterators.values():
      if hasattr(it, "close"):
        it.close()


def make_shard_group(
    source: DocumentSource,
    tokenizer: Tokenizer,
    *,
    rows_per_shard: int,
    shard_ids: Sequence[int],
    shard_count: int,
    **kwargs,
) -> ShardGroup:
  """`make_batches` for each of `shard_ids`, read side by side; kwargs go to `make_batches`."""
  return ShardGroup(
      {
          i: make_batches(
              source, tokenizer, batch_size=rows_per_shard, shard_index=i,
              shard_count=shard_count, **kwargs,
          )
          for i in shard_ids
      },
      shard_count,
  )


def eval_batches(
    source: DocumentSource,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    num_batches: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    add_bos: bool = True,
    add_eos: bool = True,
) -> list[np.ndarray]:
  """A fixed eval set: packed batches of one unshuffled pass over held-out documents.

  `num_batches=None` takes every full batch; a number takes exactly that many (the first ones),
  so that every process of a multi-process run evaluates the same number of batches, and fails
  when the held-out documents are too few.
  """
  _check(batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}")
  _check(
      num_batches is None or num_batches >= 1,
      "num_batches",
      f"must be None or >= 1, got {num_batches}",
  )
  rows = _rows(
      source, tokenizer, seq_len=seq_len, seed=None, shard_index=shard_index,
      shard_count=shard_count, num_epochs=1, add_bos=add_bos, add_eos=add_eos,
  )
  batches = iter(rows.batch(batch_size, drop_remainder=True))
  out = list(batches) if num_batches is None else list(itertools.islice(batches, num_batches))
  wanted = num_batches or 1
  if len(out) < wanted:
    raise DataError(
        f"{_describe(source)}, shard {shard_index} of {shard_count}, makes {len(out)} batches of "
        f"{batch_size} x {seq_len + 1} tokens; {wanted} needed"
    )
  return out
