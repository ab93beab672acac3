"""Tokenizers: text <-> ids, with the BOS and EOS ids the packer frames every document with.

Three kinds, chosen by `data.tokenizer`:

- `bytes`: the reference's byte ids (UTF-8 bytes 0..255, BOS 256, EOS 257; vocab 258).
- `sentencepiece`: a SentencePiece model file (the reference's `sp`, e.g. Llama 2's 32k model).
- `tiktoken`: a tiktoken BPE ranks file (Llama 3's `tokenizer.model` is one), BOS and EOS placed
  right after the ranks.

Model files are read from `data.tokenizer_path`; nothing is downloaded.
"""

from __future__ import annotations

import base64
import binascii
from typing import Protocol, Sequence

import numpy as np
from etils import epath

from memjax.config import ConfigError

TOKENIZER_KINDS = ("bytes", "sentencepiece", "tiktoken")


class Tokenizer(Protocol):
  """What the data pipeline, the probes and generation need from a tokenizer."""

  name: str
  vocab_size: int  # ids are in [0, vocab_size)
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    """The ids of `text`, without BOS or EOS."""
    ...

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`; special ids (BOS, EOS, padding) are skipped."""
    ...

  def byte_lengths(self) -> np.ndarray:
    """(2, vocab_size) int32: the UTF-8 bytes each id adds to its document's decoded text, as
    any but the document's first id (row 0) and as its first, right after BOS (row 1); special
    ids add 0. A document's ids sum to len(decode(ids).encode()) (bits per byte counts them)."""
    ...


def _check_ids(ids: Sequence[int], vocab_size: int, name: str) -> list[int]:
  ids = [int(i) for i in ids]
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(f"{name} tokenizer: ids must be in [0, {vocab_size}), got {bad[:5]}")
  return ids


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, BOS 256, EOS 257: the reference's `bytes` tokenizer."""

  name = "bytes"
  vocab_size = 258
  bos_id = 256
  eos_id = 257

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    ids = _check_ids(ids, self.vocab_size, self.name)
    # A model can emit byte sequences that are not UTF-8; show them rather than fail.
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

  def byte_lengths(self) -> np.ndarray:
    return np.tile(np.arange(self.vocab_size) < 256, (2, 1)).astype(np.int32)


class SentencePieceTokenizer:
  """A SentencePiece model; BOS and EOS are the model's own (its trainer's bos_id/eos_id).

  Text round-trips exactly when the model normalises nothing (`normalization_rule_name=identity`,
  `remove_extra_whitespaces=false`); the default NFKC rule folds some characters and spaces.
  """

  name = "sentencepiece"

  def __init__(self, model_path: str | epath.PathLike):
    import sentencepiece as spm  # only this kind needs it

    model_proto = _read_model_file(model_path)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(model_proto)
    except RuntimeError as e:
      raise ConfigError(
          "data.tokenizer_path", f"{model_path} is no SentencePiece model ({e})"
      ) from e
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise ConfigError(
          "data.tokenizer_path",
          f"the SentencePiece model {model_path} has no BOS or EOS piece "
          f"(bos_id={self.bos_id}, eos_id={self.eos_id}); train it with bos_id and eos_id >= 0"
      )

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    ids = _check_ids(ids, self.vocab_size, self.name)
    return self._sp.decode([i for i in ids if not self._sp.is_control(i)])

  def byte_lengths(self) -> np.ndarray:
    sp, out = self._sp, np.zeros((2, self.vocab_size), np.int32)
    # With add_dummy_prefix, encode puts a space before the text that decode drops again.
    first = sp.encode("a")[:1]
    dummy_prefix = bool(first) and sp.id_to_piece(first[0]).startswith("\u2581")
    for i in range(self.vocab_size):
      if sp.is_control(i) or sp.is_unused(i):
        continue
      if sp.is_byte(i):  # byte fallback: <0xE2> is one byte of a character
        out[:, i] = 1
      elif sp.is_unknown(i):  # decodes to its surface, " \u2047 " by default
        out[:, i] = len(sp.decode([i]).encode())
      else:
        piece = sp.id_to_piece(i)
        out[:, i] = len(piece.replace("\u2581", " ").encode())
        out[1, i] -= dummy_prefix and piece.startswith("\u2581")
    return out


# The pre-tokenisation split of Llama 3 (the same as OpenAI's cl100k_base): runs of letters with
# an optional leading non-letter, numbers in groups of at most 3 digits, punctuation runs,
# newlines, and whitespace, with English contractions split off. A ranks file is only meaningful
# with the pattern it was trained with; pass `pattern=` for one made with another.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


def read_tiktoken_ranks(path: str | epath.PathLike) -> dict[bytes, int]:
  """A tiktoken ranks file: one `base64(token) rank` per line, ranks 0..n-1, every byte a token.

  Parsed here rather than by `tiktoken.load`, which caches files under a temp directory keyed by
  their path, so an edited file at the same path would be read stale.
  """
  ranks: dict[bytes, int] = {}
  lines = _read_model_file(path).splitlines()
  for line_no, line in enumerate(lines, 1):
    if not line.strip():
      continue
    parts = line.split()
    try:
      if len(parts) != 2:
        raise ValueError("expected two fields")
      token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
    except (ValueError, binascii.Error) as e:
      raise ConfigError(
          "data.tokenizer_path",
          f"{path}:{line_no}: expected 'base64-token rank', got {line[:60]!r} ({e})",
      ) from None
    if token in ranks:
      raise ConfigError("data.tokenizer_path", f"{path}:{line_no}: token {token!r} is listed twice")
    ranks[token] = rank
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise ConfigError(
        "data.tokenizer_path", f"{path}: ranks must be 0..{len(ranks) - 1}, each once"
    )
  missing = [b for b in range(256) if bytes([b]) not in ranks]
  if missing:
    raise ConfigError(
        "data.tokenizer_path", f"{path}: every single byte must be a token, missing {missing[:8]}"
    )
  return ranks


class TiktokenTokenizer:
  """Byte-level BPE from a tiktoken ranks file; BOS = n_ranks, EOS = n_ranks + 1.

  For Llama 3's ranks file (128,000 ranks) these are its `<|begin_of_text|>` 128000 and
  `<|end_of_text|>` 128001; its other reserved special ids are not part of this vocabulary.
  Text that spells a special token is encoded as ordinary text.
  """

  name = "tiktoken"

  def __init__(self, path: str | epath.PathLike, pattern: str = LLAMA3_PATTERN):
    import tiktoken  # only this kind needs it

    ranks = read_tiktoken_ranks(path)
    self.bos_id, self.eos_id = len(ranks), len(ranks) + 1
    self.vocab_size = len(ranks) + 2
    self._encoding = tiktoken.Encoding(
        name=epath.Path(path).name,
        pat_str=pattern,
        mergeable_ranks=ranks,
        special_tokens={"<|begin_of_text|>": self.bos_id, "<|end_of_text|>": self.eos_id},
    )

  def encode(self, text: str) -> list[int]:
    return self._encoding.encode_ordinary(text)

  def decode(self, ids: Sequence[int]) -> str:
    ids = _check_ids(ids, self.vocab_size, self.name)
    return self._encoding.decode([i for i in ids if i < self.bos_id], errors="replace")

  def byte_lengths(self) -> np.ndarray:
    lengths = [len(self._encoding.decode_single_token_bytes(i)) for i in range(self.bos_id)]
    return np.tile(np.asarray(lengths + [0, 0], np.int32), (2, 1))


def _read_model_file(path: str | epath.PathLike) -> bytes:
  p = epath.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"data.tokenizer_path: no tokenizer model file at {path}")
  return p.read_bytes()


def make_tokenizer(kind: str, path: str | None = None) -> Tokenizer:
  """The tokenizer `kind` (one of TOKENIZER_KINDS); `path` is its model file (none for bytes)."""
  if kind == "bytes":
    if path:
      raise ConfigError(
          "data.tokenizer_path", f"the byte tokenizer takes no model file, got {path!r}"
      )
    return ByteTokenizer()
  if kind not in TOKENIZER_KINDS:
    raise ConfigError(
        "data.tokenizer", f"must be one of {', '.join(TOKENIZER_KINDS)}, got {kind!r}"
    )
  if not path:
    raise ConfigError("data.tokenizer_path", f"the {kind} tokenizer needs its model file")
  if kind == "sentencepiece":
    return SentencePieceTokenizer(path)
  return TiktokenTokenizer(path)
