"""What a run reads, from `cfg.data`: the tokenizer, the train iterator, eval batches, probes.

The knowledge corpus is built once per size under `data.data_dir` (default: `tensorflow_datasets`
in memjax's cache directory, `memjax.cache`) and read back through TFDS like any other dataset.
Its held-out text for the eval loss is the same people's biographies with their sentences in
another order: the facts are the ones trained on, the word sequences are new. Fact recall is
scored on completion probes of those facts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from memjax import data
from memjax.cache import cache_dir
from memjax.config import Config, ConfigError

# The knowledge corpus's people are drawn from this seed whatever the run's seed: runs with
# different seeds learn the same facts.
KNOWLEDGE_SEED = 0
# Held-out biographies re-order sentences with this seed (the training text uses KNOWLEDGE_SEED).
HELDOUT_ORDER_SEED = 1


@dataclasses.dataclass
class Inputs:
  tokenizer: data.Tokenizer
  train: data.ShardGroup  # next() -> int32 (local batch, seq_len + 1); get/set_state
  eval_batches: list[np.ndarray]
  probes: list[data.Probe]
  chance: dict[str, float]
  description: str


def knowledge_dir(cfg: Config) -> str:
  """Where the knowledge corpus is built: `data.data_dir`, else the cache's TFDS folder."""
  return cfg.data.data_dir or str(cache_dir("tensorflow_datasets"))


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


def data_shards(cfg: Config, process_index: int, process_count: int) -> tuple[int, range]:
  """The shard count and the shards this process reads (a contiguous block: its rows)."""
  count = cfg.data.shards or process_count
  if count % process_count:
    raise ConfigError(
        "data.shards",
        f"must be a multiple of the {process_count} processes (each reads an equal share), got "
        f"{cfg.data.shards}",
    )
  if cfg.train.batch_size % count:
    raise ConfigError(
        "train.batch_size",
        f"must be a multiple of the {count} data shards (one per process unless data.shards is "
        f"set), got {cfg.train.batch_size}",
    )
  per_process = count // process_count
  return count, range(process_index * per_process, (process_index + 1) * per_process)


def make_inputs(cfg: Config, process_index: int = 0, process_count: int = 1) -> Inputs:
  """This process's share of the data: its shards' train batches and eval batches."""
  d, train = cfg.data, cfg.train
  tokenizer = data.make_tokenizer(d.tokenizer, d.tokenizer_path or None)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ConfigError(
        "model.vocab_size",
        f"must be >= the {tokenizer.name} tokenizer's {tokenizer.vocab_size} ids, got "
        f"{cfg.model.vocab_size}",
    )
  shard_count, shard_ids = data_shards(cfg, process_index, process_count)
  rows_per_shard = train.batch_size // shard_count
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
  elif d.source == "lingua":
    source = data.lingua_source(d.root_dir, d.sources, d.text_key)
    heldout = data.file_source(d.eval_path, d.text_key) if d.eval_path else None
    description = f"Lingua sources in {d.root_dir}: {source!r}"
  elif d.source == "arrayrecord":
    tokenizer_path = d.tokenizer_path or None
    source = data.arrayrecord_source(d.path, tokenizer, tokenizer_path)
    heldout = None
    if d.eval_path:
      heldout = data.arrayrecord_source(d.eval_path, tokenizer, tokenizer_path, "data.eval_path")
    description = f"prepared shards in {d.path}"
  else:
    source = data.file_source(d.path, d.text_key)
    heldout = data.file_source(d.eval_path, d.text_key) if d.eval_path else None
    description = f"files {d.path}"
  iterator = data.make_shard_group(
      source, tokenizer, rows_per_shard=rows_per_shard, shard_ids=shard_ids,
      shard_count=shard_count, seq_len=train.seq_len, seed=seed, prefetch=d.prefetch,
      add_bos=d.add_bos, add_eos=d.add_eos,
  )
  eval_batches = []
  if heldout is not None:
    per_shard = [
        data.eval_batches(
            heldout, tokenizer, batch_size=rows_per_shard, seq_len=train.seq_len,
            num_batches=train.eval_batches, shard_index=i, shard_count=shard_count,
            add_bos=d.add_bos, add_eos=d.add_eos,
        )
        for i in shard_ids
    ]
    eval_batches = [np.concatenate(rows) for rows in zip(*per_shard)]
  description += f", {len(source):,} documents"
  if shard_count > 1:
    description += f"; reads data shards {shard_ids.start}-{shard_ids.stop - 1} of {shard_count}"
  return Inputs(tokenizer, iterator, eval_batches, probes, chance, description)
