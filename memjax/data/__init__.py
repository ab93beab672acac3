"""memjax's data: documents -> token ids -> packed (batch, seq_len + 1) int32 batches.

    sources.py     random-access documents (str): a TFDS dataset's data source (ArrayRecord,
                   no TensorFlow), local text / JSONL files, or Lingua's weighted JSONL chunk
                   folders (a `Mixture`); or token ids from shards made by prepare.py
    prepare.py     `python -m memjax.data.prepare`: text / JSONL / Lingua chunk files ->
                   tokenized ArrayRecord shards, in parallel and resumable
    knowledge.py   the embedded corpus: biographies of fictional people as a locally built TFDS
                   dataset, and completion probes of their facts (recall vs chance)
    tokenizers.py  text <-> ids: bytes (the reference's), SentencePiece, tiktoken; BOS and EOS ids
    pipeline.py    grain: shard -> shuffle per epoch -> tokenize, BOS doc EOS -> pack rows of
                   seq_len + 1 tokens (overlapping by one) -> batches; resumable, deterministic

A training run: `build_knowledge_dataset` (once) or a prepared dataset of one's own, then
`tfds_source` / `file_source` -> `make_tokenizer` -> `make_batches` (train, resumable through the
iterator's `get_state`/`set_state`) and `eval_batches` (eval loss, on a held-out split or
`split_heldout`); `probes`, `probe_ids` and `chance_level` score fact recall.
"""

from memjax.data.knowledge import (
    ATTRIBUTES,
    Person,
    Probe,
    biographies,
    biography,
    build_knowledge_dataset,
    chance_level,
    dataset_name,
    make_people,
    probe_ids,
    probes,
)
from memjax.data.pipeline import ShardGroup, eval_batches, make_batches, make_shard_group
from memjax.data.sources import (
    DataError,
    DocumentSource,
    Mixture,
    arrayrecord_source,
    file_source,
    lingua_source,
    split_heldout,
    tfds_source,
)
from memjax.data.tokenizers import (
    TOKENIZER_KINDS,
    ByteTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    make_tokenizer,
)

__all__ = [
    "ATTRIBUTES", "ByteTokenizer", "DataError", "DocumentSource", "Mixture", "Person", "Probe",
    "SentencePieceTokenizer", "ShardGroup", "TOKENIZER_KINDS", "TiktokenTokenizer", "Tokenizer",
    "arrayrecord_source", "biographies", "biography", "build_knowledge_dataset", "chance_level",
    "dataset_name", "eval_batches", "file_source", "lingua_source", "make_batches", "make_people",
    "make_shard_group", "make_tokenizer", "probe_ids", "probes", "split_heldout", "tfds_source",
]
