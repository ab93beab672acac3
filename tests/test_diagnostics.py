"""Memory-usage diagnostics: hand-computable histograms, a random case against a direct numpy
implementation, and the selections a tiny memory model records."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax import config_loading
from memjax.diagnostics import (
    MemoryUsage, collect_selections, histograms, selections_from_state,
)
from memjax.layers.memory import SELECTION
from memjax.model import Transformer

STATS = (
    "coverage", "kl_count", "kl_weight", "gini_count", "gini_weight",
    "slots_50pct_weight", "slots_90pct_weight", "slots_99pct_weight",
)


def stats_of(summary: dict, prefix: str) -> dict:
  return {name: summary[f"{prefix}/{name}"] for name in STATS}


def test_uniform_usage():
  """16 slots, each read once per head with weight 1/4, over two batches."""
  s, heads, knn = 16, 2, 4
  usage = MemoryUsage(layers=(3,), heads=heads, n_slots=s)
  slots_NHK = np.broadcast_to(np.arange(s).reshape(4, 1, knn), (4, heads, knn)).astype(np.int32)
  weights_NHK = np.full((4, heads, knn), 0.25, np.float32)
  for half in (slice(0, 2), slice(2, 4)):
    usage.update({3: (jnp.asarray(slots_NHK[half]), jnp.asarray(weights_NHK[half]))})
  summary = usage.summary()
  assert summary["memory/tokens"] == 4
  expected = dict(
      coverage=1.0, kl_count=0.0, kl_weight=0.0, gini_count=0.0, gini_weight=0.0,
      slots_50pct_weight=8, slots_90pct_weight=15, slots_99pct_weight=16,  # ceil(share * 16)
  )
  for prefix in ("memory/layer3", "memory/layer3/head0", "memory/layer3/head1"):
    assert stats_of(summary, prefix) == pytest.approx(expected, abs=1e-12), prefix


def test_all_weight_on_one_slot():
  s = 16
  usage = MemoryUsage(layers=(0,), heads=1, n_slots=s)
  usage.update({0: (jnp.full((10, 1, 1), 5, jnp.int32), jnp.ones((10, 1, 1)))})
  expected = dict(
      coverage=1 / s, kl_count=math.log(s), kl_weight=math.log(s),
      gini_count=(s - 1) / s, gini_weight=(s - 1) / s,
      slots_50pct_weight=1, slots_90pct_weight=1, slots_99pct_weight=1,
  )
  summary = usage.summary()
  for prefix in ("memory/layer0", "memory/layer0/head0"):
    assert stats_of(summary, prefix) == pytest.approx(expected, rel=1e-12), prefix


# ----------------------------------------------------------------------------------------------
# A random case against the definitions, written out directly.


def direct_stats(counts_S: np.ndarray, weights_S: np.ndarray) -> dict:
  s = counts_S.size

  def kl(h):
    p = h / h.sum()
    return sum(pi * math.log(pi * s) for pi in p if pi > 0)

  def gini(h):  # mean absolute difference over twice the mean
    return np.abs(h[:, None] - h[None, :]).sum() / (2 * s * s * h.mean())

  def slots_for(share):
    top = np.sort(weights_S)[::-1]
    return next(k for k in range(1, s + 1) if top[:k].sum() >= share * weights_S.sum())

  return dict(
      coverage=np.mean(counts_S > 0), kl_count=kl(counts_S), kl_weight=kl(weights_S),
      gini_count=gini(counts_S), gini_weight=gini(weights_S),
      slots_50pct_weight=slots_for(0.5), slots_90pct_weight=slots_for(0.9),
      slots_99pct_weight=slots_for(0.99),
  )


def test_random_usage_matches_direct_computation():
  rng = np.random.default_rng(0)
  layers, heads, knn, s = (1, 4), 3, 5, 64
  usage = MemoryUsage(layers=layers, heads=heads, n_slots=s)
  counts = {i: np.zeros((heads, s)) for i in layers}
  weights = {i: np.zeros((heads, s)) for i in layers}
  for n in (40, 7, 25):  # batches of different sizes
    batch = {}
    for i in layers:
      # Skewed slot popularity, so that the statistics are far from their uniform values.
      slots_NHK = rng.choice(s, size=(n, heads, knn), p=rng.dirichlet(np.full(s, 0.3)))
      weights_NHK = rng.dirichlet(np.ones(knn), size=(n, heads)).astype(np.float32)
      batch[i] = (jnp.asarray(slots_NHK, jnp.int32), jnp.asarray(weights_NHK))
      for t in range(n):
        for h in range(heads):
          for k in range(knn):
            counts[i][h, slots_NHK[t, h, k]] += 1
            weights[i][h, slots_NHK[t, h, k]] += weights_NHK[t, h, k]
    usage.update(batch)

  summary = usage.summary()
  assert summary["memory/tokens"] == 72
  for i in layers:
    prefix = f"memory/layer{i}"
    expected = direct_stats(counts[i].sum(0), weights[i].sum(0))
    assert stats_of(summary, prefix) == pytest.approx(expected, rel=1e-6), prefix
    for h in range(heads):
      expected = direct_stats(counts[i][h], weights[i][h])
      assert stats_of(summary, f"{prefix}/head{h}") == pytest.approx(expected, rel=1e-6)
  assert len(summary) == 1 + len(layers) * (1 + heads) * len(STATS)


def test_histograms_are_jittable_and_exact():
  rng = np.random.default_rng(1)
  slots_NHK = rng.integers(0, 32, (50, 2, 4))
  weights_NHK = rng.random((50, 2, 4)).astype(np.float32)
  counts_HS, weights_HS = jax.jit(histograms, static_argnums=2)(
      jnp.asarray(slots_NHK, jnp.int32), jnp.asarray(weights_NHK), 32
  )
  expected_counts, expected_weights = np.zeros((2, 32), np.int64), np.zeros((2, 32))
  for h in range(2):
    np.add.at(expected_counts[h], slots_NHK[:, h].ravel(), 1)
    np.add.at(expected_weights[h], slots_NHK[:, h].ravel(), weights_NHK[:, h].ravel())
  assert counts_HS.dtype == jnp.int32 and weights_HS.dtype == jnp.float32
  np.testing.assert_array_equal(counts_HS, expected_counts)
  np.testing.assert_allclose(weights_HS, expected_weights, rtol=1e-6)


def test_checks_what_it_is_given():
  usage = MemoryUsage(layers=(1, 3), heads=2, n_slots=16)
  assert usage.summary() == {}
  sel = (jnp.zeros((4, 2, 3), jnp.int32), jnp.ones((4, 2, 3)))
  with pytest.raises(ValueError, match=r"for memory layers \[1\], expected \[1, 3\]"):
    usage.update({1: sel})
  with pytest.raises(ValueError, match="heads=2"):
    usage.update({1: sel, 3: (jnp.zeros((4, 3, 3), jnp.int32), jnp.ones((4, 3, 3)))})
  with pytest.raises(ValueError, match="differ in shape"):
    usage.update({1: sel, 3: (sel[0], jnp.ones((4, 2)))})
  assert usage.summary() == {}  # the rejected batches added nothing
  assert all(int(c.sum()) == 0 for c in usage.counts.values())
  with pytest.raises(ValueError, match="dense model"):
    MemoryUsage(layers=(), heads=2, n_slots=16)


# ----------------------------------------------------------------------------------------------
# Selections from a model.


TINY_MEMORY = [
    "model.dim=32", "model.n_layers=3", "model.memory.layers=[0,2]", "model.memory.n_keys=8",
    "model.memory.heads=2", "model.memory.knn=4", "model.memory.k_dim=16",
]


@pytest.mark.usefixtures("fast_compile")
def test_collect_selections_on_a_tiny_memory_model():
  cfg = config_loading.load("tiny", TINY_MEMORY).model
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens_BT = jnp.asarray(np.random.default_rng(0).integers(0, 258, (2, 5)), jnp.int32)
  selections = collect_selections(model, tokens_BT)
  assert list(selections) == [0, 2]
  for slots_NHK, weights_NHK in selections.values():
    assert slots_NHK.shape == weights_NHK.shape == (10, 2, 4)
    assert slots_NHK.dtype == jnp.int32
    assert 0 <= int(slots_NHK.min()) and int(slots_NHK.max()) < cfg.memory.n_slots
    np.testing.assert_allclose(weights_NHK.sum(-1), 1.0, rtol=1e-6)
  assert not nnx.to_flat_state(nnx.state(model, nnx.Intermediate))  # nothing left on the model

  # The same as what a forward of the recording view records.
  view = nnx.view(model, record_selection=True)
  _, intermediates = nnx.capture(view, nnx.Intermediate)(tokens_BT)
  recorded = selections_from_state(intermediates)
  for i in cfg.memory.layers:
    np.testing.assert_array_equal(selections[i][0], recorded[i][0])
    np.testing.assert_allclose(selections[i][1], recorded[i][1], rtol=1e-5)

  usage = MemoryUsage(layers=cfg.memory.layers, heads=2, n_slots=cfg.memory.n_slots)
  usage.update(selections)
  summary = usage.summary()
  assert summary["memory/tokens"] == 10
  assert 0 < summary["memory/layer2/head1/coverage"] <= 40 / cfg.memory.n_slots


@pytest.mark.usefixtures("fast_compile")
def test_only_a_view_with_record_selection_records_the_selections():
  model = Transformer(config_loading.load("tiny", TINY_MEMORY).model, rngs=nnx.Rngs(0))
  tokens_BT = jnp.zeros((1, 4), jnp.int32)
  _, intermediates = nnx.capture(model, nnx.Intermediate)(tokens_BT)
  assert selections_from_state(intermediates) == {}
  view = nnx.view(model, record_selection=True)
  _, intermediates = nnx.capture(view, nnx.Intermediate)(tokens_BT)
  recorded = nnx.to_flat_state(intermediates)
  assert sorted(path[1] for path, _ in recorded if path[-1] == SELECTION) == [0, 2]
  assert not nnx.to_flat_state(nnx.state(model, nnx.Intermediate))  # the model is unchanged
  assert not any(model.layers[i].feed_forward.record_selection for i in (0, 2))
