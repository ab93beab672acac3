"""Memory-usage diagnostics: how evenly the memory layers read their slots over an eval window.

The usage statistics reported by the training code of the product-key memory paper ("Large
Memory Layers with Product Keys", Lample et al., 2019), per memory layer (its heads pooled) and
per head, from the slot selections of many eval batches:

- coverage: share of the S slots read at least once;
- kl_count, kl_weight: KL divergence (nats) from uniform of the distribution of reads over
  slots, counting each read once (count) or by its softmax weight (weight); 0 is perfectly even,
  log S all on one slot;
- gini_count, gini_weight: Gini coefficient of the same distributions; 0 is even, (S-1)/S is
  all on one slot;
- slots_50pct_weight, slots_90pct_weight, slots_99pct_weight: the fewest slots that carry 50,
  90 and 99 % of the total read weight.

The numbers depend on the window: more tokens raise coverage and flatten the distributions, so
compare runs over the same number of tokens (`memory/tokens`).

Where selections come from: a memory layer viewed with `record_selection=True`
(`nnx.view(model, record_selection=True, raise_if_not_found=False)`) records (slots_NHK int32,
weights_NHK) of its last call as the `nnx.Intermediate` named `memjax.layers.memory.SELECTION`;
`selections_from_state` reads them from the state of a forward (`nnx.capture`, `nnx.state` or
`nnx.pop`), `collect_selections` runs a forward for them.

Axis letters (see memjax): N tokens (B*T), H memory heads, K slots read per head (knn), S slots
(n_keys**2), B batch, T time.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from memjax.layers.memory import SELECTION
from memjax.model import Transformer, split_for_inference

Selection = tuple[jax.Array, jax.Array]  # (slots_NHK int32, weights_NHK)

SHARES = (0.5, 0.9, 0.99)


# ----------------------------------------------------------------------------------------------
# Selections.


def selections_from_state(intermediates: nnx.State) -> dict[int, Selection]:
  """The memory layers' recorded selections in a state of intermediates, by block index."""
  selections = {}
  for path, variable in nnx.to_flat_state(intermediates):
    if path[-1] == SELECTION and path[0] == "layers":
      slots_NHK, weights_NHK = variable.get_value()
      selections[int(path[1])] = (slots_NHK, weights_NHK)
  return dict(sorted(selections.items()))


def collect_selections(model: Transformer, tokens_BT: jax.Array) -> dict[int, Selection]:
  """Runs `model` (eval mode, left unchanged) on a batch and returns each memory layer's
  selection by block index: slots (B*T, H, K) int32 and their weights. Jitted; layers after the
  last memory layer and the output projection are not computed."""
  graphdef, state = split_for_inference(model)
  return _forward_selections(state, jnp.asarray(tokens_BT), graphdef=graphdef)


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward_selections(state, tokens_BT, *, graphdef):
  model = nnx.view(nnx.merge(graphdef, state), record_selection=True, raise_if_not_found=False)
  _, intermediates = nnx.capture(model, nnx.Intermediate)(tokens_BT)
  return selections_from_state(intermediates)


# ----------------------------------------------------------------------------------------------
# Accumulation.


def histograms(
    slots_NHK: jax.Array, weights_NHK: jax.Array, n_slots: int
) -> tuple[jax.Array, jax.Array]:
  """Per head, how often each slot was read and its summed weight: (H, S) int32 and float32.

  Jittable (n_slots is static): one segment sum over head-offset slot ids per histogram. Slots
  must lie in [0, n_slots), as the memory layer's do.
  """
  n, heads, knn = slots_NHK.shape
  offsets_H1 = n_slots * jnp.arange(heads, dtype=slots_NHK.dtype)[:, None]
  bins = (slots_NHK + offsets_H1).reshape(-1)
  add = functools.partial(jax.ops.segment_sum, segment_ids=bins, num_segments=heads * n_slots)
  counts = add(jnp.ones(n * heads * knn, jnp.int32))
  weights = add(weights_NHK.reshape(-1).astype(jnp.float32))
  return counts.reshape(heads, n_slots), weights.reshape(heads, n_slots)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _accumulate(counts_HS, weights_HS, slots_NHK, weights_NHK):
  counts, weights = histograms(slots_NHK, weights_NHK, counts_HS.shape[1])
  return counts_HS + counts, weights_HS + weights


class MemoryUsage:
  """Slot-usage histograms of every memory layer over an eval window, and their statistics.

    mem = cfg.model.memory
    usage = MemoryUsage(layers=mem.layers, heads=mem.heads, n_slots=mem.n_slots)
    for tokens_BT in eval_batches:
      usage.update(collect_selections(model, tokens_BT))
    metrics = usage.summary()  # {"memory/layer1/coverage": 0.93, "memory/layer1/head0/...": ...}

  The histograms stay on the device and each update is one jitted scatter-add per layer; only
  `summary` brings them to the host.
  """

  def __init__(self, *, layers: Sequence[int], heads: int, n_slots: int):
    if not layers:
      raise ValueError("layers is empty: a dense model has no memory usage to measure")
    if heads < 1 or n_slots < 1:
      raise ValueError(f"heads and n_slots must be >= 1, got {heads} and {n_slots}")
    self.layers, self.heads, self.n_slots = tuple(sorted(layers)), heads, n_slots
    self.reset()

  def reset(self) -> None:
    """Starts a new window."""
    shape = (self.heads, self.n_slots)
    self.counts = {i: jnp.zeros(shape, jnp.int32) for i in self.layers}  # (H, S) per layer
    self.weights = {i: jnp.zeros(shape, jnp.float32) for i in self.layers}
    self.tokens = 0

  def update(self, selections: Mapping[int, Selection]) -> None:
    """Adds one batch: the selections of every memory layer, by block index."""
    if sorted(selections) != list(self.layers):
      raise ValueError(
          f"selections are for memory layers {sorted(selections)}, expected {list(self.layers)}"
      )
    # Everything is checked before anything is added: a bad batch leaves the window as it was.
    for i, (slots_NHK, weights_NHK) in selections.items():
      if slots_NHK.ndim != 3 or slots_NHK.shape[1] != self.heads:
        raise ValueError(
            f"layer {i}: slots must be (tokens, heads={self.heads}, knn), got {slots_NHK.shape}"
        )
      if weights_NHK.shape != slots_NHK.shape:
        raise ValueError(
            f"layer {i}: weights {weights_NHK.shape} and slots {slots_NHK.shape} differ in shape"
        )
    for i, (slots_NHK, weights_NHK) in selections.items():
      self.counts[i], self.weights[i] = _accumulate(
          self.counts[i], self.weights[i], slots_NHK, weights_NHK
      )
    self.tokens += slots_NHK.shape[0]

  def summary(self) -> dict[str, float]:
    """Flat metrics for logging (see the module docstring); empty before the first read."""
    if self.tokens == 0:
      return {}
    # A multi-process run's histograms may span other processes' devices.
    counts, weights = multihost_utils.process_allgather((self.counts, self.weights), tiled=True)
    out = {"memory/tokens": float(self.tokens)}
    for i in self.layers:
      prefix = f"memory/layer{i}"
      out |= _prefixed(prefix, usage_stats(counts[i].sum(0), weights[i].sum(0)))
      for h in range(self.heads):
        out |= _prefixed(f"{prefix}/head{h}", usage_stats(counts[i][h], weights[i][h]))
    return out


def _prefixed(prefix: str, stats: dict[str, float]) -> dict[str, float]:
  return {f"{prefix}/{name}": value for name, value in stats.items()}


# ----------------------------------------------------------------------------------------------
# Statistics of one histogram (numpy, float64, on the host).


def usage_stats(counts_S: np.ndarray, weights_S: np.ndarray) -> dict[str, float]:
  """Coverage, KL from uniform, Gini and the slots holding each share of the weight."""
  # Each histogram is sorted once: with a million slots the sorts are most of the cost.
  counts_S = np.sort(np.asarray(counts_S, np.float64))
  weights_S = np.sort(np.asarray(weights_S, np.float64))
  stats = {
      "coverage": float(np.count_nonzero(counts_S)) / counts_S.size,
      "kl_count": _kl_from_uniform(counts_S),
      "kl_weight": _kl_from_uniform(weights_S),
      "gini_count": _gini(counts_S),
      "gini_weight": _gini(weights_S),
  }
  for share in SHARES:
    stats[f"slots_{round(share * 100)}pct_weight"] = float(_slots_for_share(weights_S, share))
  return stats


def _kl_from_uniform(hist_S: np.ndarray) -> float:
  """KL(p || uniform) in nats, p = hist / sum(hist): sum p log(p S), with 0 log 0 = 0."""
  p_S = hist_S / hist_S.sum()
  p_S = p_S[p_S > 0]
  return float(np.sum(p_S * np.log(p_S * hist_S.size)))


def _gini(ascending_S: np.ndarray) -> float:
  """Gini coefficient of an ascending histogram: sum_i (2i - S - 1) x_i / (S sum x), i from 1."""
  s = ascending_S.size
  ranks_S = np.arange(1, s + 1, dtype=np.float64)
  return float(np.sum((2 * ranks_S - s - 1) * ascending_S) / (s * ascending_S.sum()))


def _slots_for_share(ascending_S: np.ndarray, share: float) -> int:
  """The fewest slots whose summed weight reaches `share` of the total (ascending histogram)."""
  running_S = np.cumsum(ascending_S[::-1])
  # The slack keeps rounding in the running sum from asking for a slot that exact sums would
  # not need (e.g. exactly half the slots of a uniform histogram hold half the weight).
  return int(np.searchsorted(running_S, share * running_S[-1] * (1 - 1e-9))) + 1
