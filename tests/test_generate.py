"""Generation: the cached decode against the full forward, greedy decoding, top-p sampling,
stopping, and the checks on what callers pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax import config_loading
from memjax.generate import generate, greedy_complete, sample_tokens
from memjax.model import Transformer, split_for_inference

pytestmark = pytest.mark.usefixtures("fast_compile")

SMALL = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.max_seqlen=32", "train.seq_len=32",
    "model.memory.n_keys=16", "model.memory.heads=2", "model.memory.knn=4", "model.memory.k_dim=32",
]
LAYERS = {"dense": "model.memory.layers=[]", "memory": "model.memory.layers=[1]"}
# Rows of different lengths, one only a BOS.
PROMPTS = [[256, 72, 105, 33, 10, 7, 8, 9, 3], [256], [256, 65, 66, 67]]
MAX_NEW = 8


@functools.cache
def make_model(kind: str) -> Transformer:
  cfg = config_loading.load("tiny", [*SMALL, LAYERS[kind]])
  return Transformer(cfg.model, rngs=nnx.Rngs(0))


@functools.cache
def greedy_rows(kind: str) -> list[list[int]]:
  return generate(make_model(kind), PROMPTS, max_new_tokens=MAX_NEW)


@functools.partial(jax.jit, static_argnames="graphdef")
def full_logits(state, tokens_BT, *, graphdef):
  return nnx.merge(graphdef, state)(tokens_BT)


@functools.partial(jax.jit, static_argnames="graphdef")
def extend(state, tokens_BT, cache, n_valid_B, *, graphdef):
  return nnx.merge(graphdef, state).extend(tokens_BT, cache, n_valid_B)


def max_relative_error(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("kind", LAYERS)
def test_cached_decode_matches_full_forward(kind):
  """A ragged prefill then single steps give, at every position, the full forward's logits."""
  model = make_model(kind)
  graphdef, state = split_for_inference(model)
  rng = np.random.default_rng(0)
  tokens_BT = rng.integers(0, 258, (3, 12)).astype(np.int32)
  full_BTW = full_logits(state, jnp.asarray(tokens_BT), graphdef=graphdef)

  lengths_B = np.array([2, 5, 7], np.int32)
  # Right padding with other tokens: nothing may attend to it.
  padded_BP = np.where(
      np.arange(7) < lengths_B[:, None], tokens_BT[:, :7], rng.integers(0, 258, (3, 7))
  ).astype(np.int32)
  cache = model.init_cache(3, 16)
  logits_BPW, cache = extend(
      state, jnp.asarray(padded_BP), cache, jnp.asarray(lengths_B), graphdef=graphdef
  )
  np.testing.assert_array_equal(cache.lengths_B, lengths_B)
  for b, n in enumerate(lengths_B):
    assert max_relative_error(logits_BPW[b, :n], full_BTW[b, :n]) < 1e-5

  rows = np.arange(3)
  for step in range(5):  # the longest row reaches position 11, the end of the sequence
    positions_B = lengths_B + step
    logits_B1W, cache = extend(
        state, jnp.asarray(tokens_BT[rows, positions_B, None]), cache, None, graphdef=graphdef
    )
    np.testing.assert_array_equal(cache.lengths_B, positions_B + 1)
    assert max_relative_error(logits_B1W[:, 0], full_BTW[rows, positions_B]) < 1e-5, step


@pytest.mark.parametrize("kind", LAYERS)
def test_greedy_is_argmax_of_full_forward(kind):
  model = make_model(kind)
  before = jax.tree.leaves(nnx.state(model))
  rows = greedy_rows(kind)
  graphdef, state = split_for_inference(model)
  assert [len(r) for r in rows] == [MAX_NEW] * len(PROMPTS)
  for prompt, new in zip(PROMPTS, rows):
    logits_TW = full_logits(state, jnp.asarray([prompt + new]), graphdef=graphdef)[0]
    # The token after position t is the argmax of the logits at t.
    predicted = np.argmax(logits_TW[len(prompt) - 1 : -1], axis=-1)
    np.testing.assert_array_equal(predicted, new)
  # The caller's model is neither changed nor given state (a cache, recorded selections).
  after = jax.tree.leaves(nnx.state(model))
  assert len(after) == len(before) and all(a is b for a, b in zip(after, before))


def test_top_p_near_zero_is_greedy():
  model = make_model("memory")
  sampled = generate(
      model, PROMPTS, max_new_tokens=MAX_NEW, temperature=0.7, top_p=1e-6,
      rng=jax.random.key(1),
  )
  assert sampled == greedy_rows("memory")


def test_sampling_is_reproducible():
  model = make_model("memory")
  sample = functools.partial(generate, model, PROMPTS, max_new_tokens=MAX_NEW, temperature=1.0)
  first = sample(rng=jax.random.key(7))
  assert sample(rng=jax.random.key(7)) == first
  # An untrained model's next-token distribution is close to uniform over 258 ids.
  assert sample(rng=jax.random.key(8)) != first
  assert first != greedy_rows("memory")
  assert all(len(r) == MAX_NEW and all(0 <= t < 258 for t in r) for r in first)


@pytest.mark.parametrize("kind", LAYERS)
def test_rows_stop_at_eos(kind):
  greedy = greedy_rows(kind)
  # A token that row 0 first makes after its first step, so that row stops mid-way.
  eos = next(t for i, t in enumerate(greedy[0]) if i > 0 and t not in greedy[0][:i])

  def cut(row, stops):
    ends = [i for i, t in enumerate(row) if t in stops]
    return row[: ends[0] + 1] if ends else row

  rows = generate(make_model(kind), PROMPTS, max_new_tokens=MAX_NEW, eos_id=eos)
  assert rows == [cut(r, {eos}) for r in greedy]
  assert 1 < len(rows[0]) and rows[0][-1] == eos

  # greedy_complete leaves the stop token out; a row may stop on its first token.
  stops = [eos, greedy[1][0]]
  completions = greedy_complete(
      make_model(kind), PROMPTS, max_new_tokens=MAX_NEW, stop_ids=stops
  )
  expected = [cut(r, set(stops)) for r in greedy]
  assert completions == [r[:-1] if r[-1] in stops else r for r in expected]
  assert completions[1] == []


def test_sample_tokens_keeps_the_nucleus():
  probs_W = np.array([0.5, 0.3, 0.15, 0.05])
  logits_BW = jnp.tile(jnp.log(jnp.asarray(probs_W, jnp.float32)), (4000, 1))
  key = jax.random.key(0)

  def frequencies(temperature, top_p):
    tokens_B = sample_tokens(logits_BW, key, temperature, top_p)
    return np.bincount(np.asarray(tokens_B), minlength=4) / len(tokens_B)

  # Mass ranked above each token: 0, 0.5, 0.8, 0.95.
  np.testing.assert_allclose(frequencies(1.0, 0.7), [0.625, 0.375, 0, 0], atol=0.03)
  np.testing.assert_allclose(frequencies(1.0, 0.9), np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.03)
  np.testing.assert_allclose(frequencies(1.0, 1.0), probs_W, atol=0.03)
  np.testing.assert_array_equal(frequencies(1.0, 1e-6), [1, 0, 0, 0])
  # Temperature sharpens (p ** 1/T, renormalised) before the nucleus is cut.
  sharp = probs_W**4 / np.sum(probs_W**4)
  np.testing.assert_allclose(frequencies(0.25, 1.0), sharp, atol=0.03)


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([], {}, "prompt_ids is empty"),
        ([[256], []], {}, r"prompt_ids\[1\] is empty"),
        ([[256, 300]], {}, r"outside \[0, 258\)"),
        ([[256]], {"eos_id": 258}, "stop ids"),
        ([[256]], {"max_new_tokens": -1}, "max_new_tokens"),
        ([[256]], {"temperature": -0.5}, "temperature"),
        ([[256]], {"top_p": 0.0}, "top_p"),
        ([[256]], {"top_p": 1.5}, "top_p"),
        ([[256]], {"temperature": 1.0}, "needs rng"),
        ([[256] * 30], {"max_new_tokens": 3}, "max_seqlen=32"),
    ],
)
def test_rejects_bad_requests(prompts, kwargs, message):
  with pytest.raises(ValueError, match=message):
    generate(make_model("dense"), prompts, **({"max_new_tokens": 4} | kwargs))


def test_no_new_tokens():
  assert generate(make_model("dense"), PROMPTS, max_new_tokens=0) == [[], [], []]
