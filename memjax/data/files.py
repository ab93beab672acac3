"""The whole-corpus byte reader of the first train.py (BOS 256 and EOS 257 around each file).

Kept while train.py moves to `memjax.data.pipeline`, which supersedes it (any tokenizer, every
token seen once per epoch, resumable state).
"""

from __future__ import annotations

import glob
import pathlib
from typing import Iterator, Sequence

import numpy as np

BOS, EOS = 256, 257
_PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository root


def default_globs() -> tuple[str, ...]:
  """The package's own Markdown and Python files: text that is always there, nothing downloaded."""
  return tuple(str(_PACKAGE_ROOT / "**" / f"*.{ext}") for ext in ("md", "py"))


def read_corpus(patterns: Sequence[str]) -> np.ndarray:
  """All files matching any pattern as one int32 stream of byte ids, each framed by BOS/EOS."""
  matches = {p for pattern in patterns for p in glob.glob(pattern, recursive=True)}
  paths = sorted(p for p in matches if pathlib.Path(p).is_file())
  if not paths:
    raise FileNotFoundError(f"train.data: no files match {', '.join(map(repr, patterns))}")
  docs = []
  for p in paths:
    data = np.frombuffer(pathlib.Path(p).read_bytes(), dtype=np.uint8)
    docs.append(np.concatenate([[BOS], data, [EOS]]))
  return np.concatenate(docs).astype(np.int32)


def random_windows(
    tokens: np.ndarray, batch_size: int, seq_len: int, seed: int
) -> Iterator[np.ndarray]:
  """Endless (batch_size, seq_len + 1) windows at seeded random offsets (inputs and targets)."""
  if len(tokens) <= seq_len + 1:
    raise ValueError(f"corpus of {len(tokens)} tokens is shorter than train.seq_len + 1")
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    yield np.stack([tokens[s : s + seq_len + 1] for s in starts])
