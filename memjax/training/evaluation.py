"""The evals a run schedules: held-out loss, perplexity and bits per byte, fact recall and
memory usage.

Each eval is an object with a `name` that computes its metrics from an `EvalContext` and formats
its own log lines and its part of the run's summary line; `make_evals` lists those a run has.
The training loop only schedules them. An `EvalContext` is one evaluation of one model state:
work that several evals need (the eval batches' forward pass, read by the held-out loss and the
memory usage) runs there at most once.

Fact recall is greedy decoding of the answer, scored by exact match. It is computed in one
teacher-forced pass: greedy decoding reproduces the answer's tokens exactly when, at every answer
position, the argmax next token given the prompt and the answer so far is the answer's token.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax import data, diagnostics, sharding
from memjax.config import Config, MemoryConfig
from memjax.training.inputs import Inputs
from memjax.training.state import TrainState

Metrics = dict[str, float]


@dataclasses.dataclass(frozen=True)
class HeldOutPass:
  """What the eval batches' forward pass gives: the summed token loss, the token count, and
  (memory models) the slot usage of their reads."""

  loss_sum: float
  tokens: int
  usage: diagnostics.MemoryUsage | None


class EvalContext:
  """One evaluation of `state`: its evals share the eval batches' forward pass, run on first use.

  `eval_step(params, other, tokens_BT) -> (summed loss, token count, intermediates)` is
  `step.make_eval_step`, jitted; `batches` are the placed eval batches, (B, T + 1) each.
  """

  def __init__(
      self, state: TrainState, *, eval_step: Callable, batches: Sequence[jax.Array],
      memory: MemoryConfig,
  ):
    self.state, self.batches = state, batches
    self._eval_step, self._memory = eval_step, memory

  @functools.cached_property
  def heldout(self) -> HeldOutPass:
    """The pass over the eval batches. Each batch's selections feed the usage histograms and are
    dropped, so the pass holds one batch's at a time."""
    usage = None
    if self._memory.enabled:
      usage = diagnostics.MemoryUsage(
          layers=self._memory.layers, heads=self._memory.heads, n_slots=self._memory.n_slots
      )
    total, count = 0.0, 0
    for batch in self.batches:
      loss_sum, n, intermediates = self._eval_step(self.state.params, self.state.other, batch)
      total, count = total + float(loss_sum), count + int(n)
      if usage is not None:
        usage.update(diagnostics.selections_from_state(intermediates))
    return HeldOutPass(total, count, usage)


class Eval(Protocol):
  """One eval. `lines` and `summary` read the metrics its own call returned."""

  name: str

  def __call__(self, ctx: EvalContext) -> Metrics: ...

  def lines(self, metrics: Metrics) -> list[str]:
    """Its log lines (none for empty metrics)."""
    ...

  def summary(self, metrics: Metrics) -> str:
    """Its part of the run's final summary line; "" for none."""
    ...


def make_evals(
    cfg: Config, inputs: Inputs, graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh
) -> list[Eval]:
  """The evals this run's config and inputs allow, in the order their lines print."""
  evals: list[Eval] = []
  if inputs.eval_batches:
    evals.append(HeldOutLoss(inputs.tokenizer))
  if inputs.probes:
    forward = make_forward(graphdef, out_sharding=sharding.replicated(mesh))
    evals.append(
        FactRecall(
            forward, inputs.probes, inputs.tokenizer, chance=inputs.chance,
            max_len=cfg.model.max_seqlen,
            # Rows a multiple of the devices, so that the lookup splits the tokens evenly.
            batch_size=math.lcm(64, jax.device_count()),
        )
    )
  if inputs.eval_batches and cfg.model.memory.enabled:
    evals.append(SlotUsage())
  return evals


# ----------------------------------------------------------------------------------------------
# Held-out loss.


class HeldOutLoss:
  """Mean token loss, perplexity and bits per byte over the eval batches.

  Bits per byte is the summed token loss in bits over the UTF-8 bytes of the text the target
  tokens decode to (`tokenizer.byte_lengths()`, BOS, EOS and padding 0 bytes): unlike the loss
  per token, it compares runs with different tokenizers. The bytes are counted on device, from
  the same placed batches as the loss.
  """

  name = "heldout"

  def __init__(self, tokenizer: data.Tokenizer):
    self.byte_lengths_2W = tokenizer.byte_lengths()
    self.bos_id = tokenizer.bos_id

  def __call__(self, ctx: EvalContext) -> Metrics:
    heldout = ctx.heldout
    if not heldout.tokens:
      return {}
    loss = heldout.loss_sum / heldout.tokens
    out = {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 80.0)))}
    n_bytes = sum(
        int(_target_bytes(self.byte_lengths_2W, self.bos_id, batch)) for batch in ctx.batches
    )
    if n_bytes:
      out["eval/bits_per_byte"] = heldout.loss_sum / math.log(2) / n_bytes
    return out

  def lines(self, metrics: Metrics) -> list[str]:
    if not metrics:
      return []
    line = f"eval loss {metrics['eval/loss']:.4f} (perplexity {metrics['eval/perplexity']:.2f}"
    if "eval/bits_per_byte" in metrics:
      line += f", {metrics['eval/bits_per_byte']:.4f} bits per byte"
    return [line + ")"]

  def summary(self, metrics: Metrics) -> str:
    if not metrics:
      return ""
    if "eval/bits_per_byte" not in metrics:
      return f"eval loss {metrics['eval/loss']:.4f}"
    return f"eval loss {metrics['eval/loss']:.4f} ({metrics['eval/bits_per_byte']:.4f} bits/byte)"


@jax.jit
def _target_bytes(byte_lengths_2W, bos_id, tokens_BT):
  """UTF-8 bytes of the text that the targets of (B, T + 1) rows decode to: a target right after
  BOS reads row 1 of the table (SentencePiece's dummy-prefix space is no byte of the text)."""
  after_bos_BT = (tokens_BT[:, :-1] == bos_id).astype(jnp.int32)
  return jnp.sum(byte_lengths_2W[after_bos_BT, tokens_BT[:, 1:]])


# ----------------------------------------------------------------------------------------------
# Fact recall.


class FactRecall:
  """Share of the knowledge probes whose answer greedy decoding reproduces exactly, overall and
  per attribute, beside chance.

  `forward(params, other, tokens_BT) -> logits_BTW` is jitted (`make_forward`); rows are padded to
  one width and `batch_size` rows, so it compiles once.
  """

  name = "recall"

  def __init__(
      self, forward: Callable, probes: Sequence[data.Probe], tokenizer: data.Tokenizer, *,
      chance: dict[str, float], max_len: int, batch_size: int = 64,
  ):
    self.forward, self.probes, self.tokenizer = forward, list(probes), tokenizer
    self.chance, self.max_len, self.batch_size = chance, max_len, batch_size

  def __call__(self, ctx: EvalContext) -> Metrics:
    params, other = ctx.state.params, ctx.state.other
    return fact_recall(
        lambda tokens_BT: self.forward(params, other, tokens_BT), self.probes, self.tokenizer,
        chance=self.chance, batch_size=self.batch_size, max_len=self.max_len,
    )

  def lines(self, metrics: Metrics) -> list[str]:
    if not metrics:
      return []
    per = ", ".join(
        f"{k.split('/', 1)[1]} {v:.0%}" for k, v in metrics.items()
        if k not in ("recall/all", "recall/chance")
    )
    return [f"{self.summary(metrics)}; {per}"]

  def summary(self, metrics: Metrics) -> str:
    if not metrics:
      return ""
    return f"fact recall {metrics['recall/all']:.1%} (chance {metrics['recall/chance']:.1%})"


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
) -> Metrics:
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


# ----------------------------------------------------------------------------------------------
# Memory usage.


class SlotUsage:
  """How evenly the memory layers read their slots over the eval batches (`memjax.diagnostics`):
  per layer and head, coverage, KL from uniform, Gini and the slots holding each weight share."""

  name = "memory"

  def __call__(self, ctx: EvalContext) -> Metrics:
    usage = ctx.heldout.usage
    return usage.summary() if usage is not None else {}

  def lines(self, metrics: Metrics) -> list[str]:
    # The per-layer figures (memory/layerI/STAT); the per-head ones go to the metrics file only.
    layers = sorted(k for k in metrics if k.count("/") == 2)
    if not layers:
      return []
    return ["memory: " + ", ".join(f"{k[len('memory/'):]} {metrics[k]:.3g}" for k in layers)]

  def summary(self, metrics: Metrics) -> str:
    del metrics
    return ""
