"""What a run reads, from `cfg.data`: the tokenizer, the train iterator, eval batches, probes.

The knowledge corpus is built once per size under `data.data_dir` (default
`~/.cache/memjax/tensorflow_datasets`) and read back through TFDS like any other dataset. Its
held-out text for the eval loss is the same people's biographies with their sentences in another
order: the facts are the ones trained on, the word sequences are new. Fact recall is scored on
completion probes of those facts.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from memjax import data
from memjax.config import Config, ConfigError

# The knowledge corpus's people are drawn from this seed whatever the run's seed: runs with
# different seeds learn the same facts.
KNOWLEDGE_SEED = 0
# Held-out biographies re-order sentences with this seed (the training text uses KNOWLEDGE_SEED).
HELDOUT_ORDER_SEED = 1


@dataclasses.dataclass
class Inputs:
  tokenizer: data.Tokenizer
  train: object  # grain iterator: next() -> int32 (local batch, seq_len + 1); get/set_state
  eval_batches: list[np.ndarray]
  probes: list[data.Probe]
  chance: dict[str, float]
  description: str


def knowledge_dir(cfg: Config) -> str:
  if cfg.data.data_dir:
    return cfg.data.data_dir
  base = os.environ.get("MEMJAX_CACHE_DIR") or pathlib.Path.home() / ".cache" / "memjax"
  return str(pathlib.Path(base) / "tensorflow_datasets")


def _quiet_tfds() -> None:
  import tensorflow_datasets as tfds
  from absl import logging

  tfds.disable_progress_bar()
  logging.set_verbosity(logging.WARNING)


def _spread(items: list, n: int) -> list:
  """n items evenly spread over `items` (all when n is 0 or too large)."""
  if n == 0 or n >= len(items):
    return list(items)
  return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def make_inputs(cfg: Config, shard_index: int = 0, shard_count: int = 1) -> Inputs:
  d, train = cfg.data, cfg.train
  tokenizer = data.make_tokenizer(d.tokenizer, d.tokenizer_path or None)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ConfigError(
        "model.vocab_size",
        f"must be >= the {tokenizer.name} tokenizer's {tokenizer.vocab_size} ids, got "
        f"{cfg.model.vocab_size}",
    )
  local_batch = train.batch_size // shard_count
  seed = cfg.seed if d.seed is None else d.seed
  probes: list[data.Probe] = []
  chance: dict[str, float] = {}
  if d.source == "knowledge":
    data_dir = knowledge_dir(cfg)
    _quiet_tfds()  # a seconds-long local build: TFDS's download wording and bars would mislead
    data.build_knowledge_dataset(d.people, KNOWLEDGE_SEED, data_dir)
    name = data.dataset_name(d.people, KNOWLEDGE_SEED)
    source = data.tfds_source(name, "train", data_dir)
    people = data.make_people(d.people, KNOWLEDGE_SEED)
    heldout = data.biographies(people, HELDOUT_ORDER_SEED)
    probes = _spread(data.probes(people), train.probes)
    chance = {a: data.chance_level(a) for a in data.ATTRIBUTES}
    description = f"knowledge corpus of {d.people} people ({name} in {data_dir})"
  elif d.source == "tfds":
    source = data.tfds_source(d.name, d.split, d.data_dir or None, d.text_key)
    heldout = data.tfds_source(d.name, d.eval_split, d.data_dir or None, d.text_key) if d.eval_split else None
    description = f"TFDS {d.name} split {d.split}"
  else:
    source = data.file_source(d.path, d.text_key)
    heldout = data.file_source(d.eval_path, d.text_key) if d.eval_path else None
    description = f"files {d.path}"
  iterator = data.make_batches(
      source, tokenizer, batch_size=local_batch, seq_len=train.seq_len, seed=seed,
      shard_index=shard_index, shard_count=shard_count, prefetch=d.prefetch,
  )
  eval_batches = []
  if heldout is not None:
    eval_batches = data.eval_batches(
        heldout, tokenizer, batch_size=local_batch, seq_len=train.seq_len,
        num_batches=train.eval_batches, shard_index=shard_index, shard_count=shard_count,
    )
  return Inputs(tokenizer, iterator, eval_batches, probes, chance, f"{description}, {len(source):,} documents")
