"""Eval: held-out loss and perplexity, fact recall on the knowledge probes, memory diagnostics.

Fact recall is greedy decoding of the answer, scored by exact match. It is computed in one
teacher-forced pass: greedy decoding reproduces the answer's tokens exactly when, at every answer
position, the argmax next token given the prompt and the answer so far is the answer's token.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax import data, diagnostics
from memjax.config import Config


def eval_loss(
    eval_step: Callable, params, other, batches: Sequence[np.ndarray], usage=None
) -> dict[str, float]:
  """Mean token loss and perplexity over fixed batches; feeds the selections to `usage`."""
  if not batches:
    return {}
  total, count = 0.0, 0
  for batch in batches:
    loss_sum, n, selections = eval_step(params, other, jnp.asarray(batch))
    total, count = total + float(loss_sum), count + int(n)
    if usage is not None:
      usage.update(diagnostics.selections_from_state(selections))
  loss = total / max(count, 1)
  return {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 80.0)))}


def _probe_rows(probe_ids, tokenizer, width: int):
  """Token rows [BOS] + prompt + answer, padded to `width`, and each answer's span."""
  rows, spans = [], []
  for prompt, answer in probe_ids:
    ids = [tokenizer.bos_id, *prompt, *answer][:width]
    spans.append((1 + len(prompt), 1 + len(prompt) + len(answer)))
    rows.append(ids + [tokenizer.eos_id] * (width - len(ids)))
  return np.asarray(rows, np.int32), spans


def fact_recall(
    forward: Callable, probes, tokenizer, *, chance: dict[str, float], batch_size: int = 64,
    max_len: int,
) -> dict[str, float]:
  """Share of probes whose answer greedy decoding reproduces exactly, overall and per attribute.

  `forward(tokens_BT) -> logits_BTW` (jitted by the caller); rows are padded to one width so it
  compiles once.
  """
  if not probes:
    return {}
  ids = [data.probe_ids(p, tokenizer) for p in probes]
  width = min(max(1 + len(prompt) + len(answer) for prompt, answer in ids), max_len)
  hits = collections.Counter()
  totals = collections.Counter()
  for start in range(0, len(probes), batch_size):
    chunk = list(probes[start : start + batch_size])
    rows, spans = _probe_rows(ids[start : start + batch_size], tokenizer, width)
    pad = batch_size - len(chunk)
    if pad:
      rows = np.concatenate([rows, np.repeat(rows[-1:], pad, axis=0)])
    predicted = np.asarray(jnp.argmax(forward(jnp.asarray(rows[:, :-1])), axis=-1))
    for r, (probe, (lo, hi)) in enumerate(zip(chunk, spans)):
      # The token at position i is predicted from the logits at position i - 1.
      correct = hi <= width and bool(np.all(predicted[r, lo - 1 : hi - 1] == rows[r, lo:hi]))
      hits[probe.attribute] += correct
      totals[probe.attribute] += 1
  out = {"recall/all": sum(hits.values()) / sum(totals.values())}
  out["recall/chance"] = float(np.mean([chance[p.attribute] for p in probes]))
  for attribute in sorted(totals):
    out[f"recall/{attribute}"] = hits[attribute] / totals[attribute]
  return out


def make_forward(graphdef: nnx.GraphDef, out_sharding=None) -> Callable:
  """Jitted `forward(params, other, tokens_BT) -> logits_BTW`, dropout off.

  `out_sharding` places the logits; a multi-process run asks for them replicated, since the host
  reads them whole.
  """

  @functools.partial(jax.jit, out_shardings=out_sharding)
  def forward(params, other, tokens_BT):
    model = nnx.merge(graphdef, params, other)
    return nnx.view(model, deterministic=True, raise_if_not_found=False)(tokens_BT)

  return forward


def recall_chance_note(metrics: dict[str, float]) -> str:
  if "recall/all" not in metrics:
    return ""
  return f"fact recall {metrics['recall/all']:.1%} (chance {metrics['recall/chance']:.1%})"


def memory_usage_for(cfg: Config):
  if not cfg.model.memory.enabled:
    return None
  return diagnostics.MemoryUsage(
      layers=tuple(cfg.model.memory.layers),
      heads=cfg.model.memory.heads,
      n_slots=cfg.model.memory.n_slots,
  )
