"""The evals a run schedules: which a run gets, one shared forward pass per evaluation, bits per
byte for each tokenizer kind, and the lines and summary parts they print."""

import base64
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax import config_loading, data, sharding
from memjax.model import Transformer
from memjax.training import evaluation, inputs as inputs_lib, state as state_lib, step as step_lib

pytestmark = pytest.mark.usefixtures("fast_compile")

SMALL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.memory.n_keys=8",
    "model.memory.knn=4", "model.memory.heads=2", "model.memory.k_dim=16", "model.max_seqlen=32",
    "train.seq_len=32",
]


def small_config(memory_layers: str = "[1]"):
  return config_loading.load("tiny", [*SMALL, f"model.memory.layers={memory_layers}"])


def small_inputs(eval_batches: int, probes: int) -> inputs_lib.Inputs:
  people = data.make_people(4, 0)
  return inputs_lib.Inputs(
      tokenizer=data.make_tokenizer("bytes"), train=None,
      eval_batches=[np.zeros((8, 9), np.int32)] * eval_batches,
      probes=data.probes(people)[:probes],
      chance={a: data.chance_level(a) for a in data.ATTRIBUTES}, description="",
  )


@pytest.mark.parametrize(
    "memory_layers, eval_batches, probes, names",
    [("[1]", 2, 3, ["heldout", "recall", "memory"]), ("[]", 2, 3, ["heldout", "recall"]),
     ("[1]", 0, 3, ["recall"]), ("[1]", 2, 0, ["heldout", "memory"])],
)
def test_a_run_gets_the_evals_its_config_and_inputs_allow(
    memory_layers, eval_batches, probes, names
):
  cfg = small_config(memory_layers)
  mesh = sharding.make_mesh(cfg.mesh)
  evals = evaluation.make_evals(
      cfg, small_inputs(eval_batches, probes), state_lib.model_graphdef(cfg), mesh
  )
  assert [ev.name for ev in evals] == names


def test_held_out_loss_and_slot_usage_share_one_pass_over_the_eval_batches():
  cfg = small_config()
  graphdef, params, other = state_lib.split_model(Transformer(cfg.model, rngs=nnx.Rngs(0)))
  jitted = jax.jit(step_lib.make_eval_step(cfg, graphdef))
  calls = []

  def eval_step(params, other, tokens_BT1):
    calls.append(tokens_BT1.shape)
    return jitted(params, other, tokens_BT1)

  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, 258, (2, 9)), jnp.int32) for _ in range(3)]
  ctx = evaluation.EvalContext(
      types.SimpleNamespace(params=params, other=other), eval_step=eval_step, batches=batches,
      memory=cfg.model.memory,
  )
  loss = evaluation.HeldOutLoss(data.make_tokenizer("bytes"))(ctx)
  usage = evaluation.SlotUsage()(ctx)
  assert len(calls) == 3  # once per batch, for both evals
  sums = [jitted(params, other, b)[:2] for b in batches]
  tokens = sum(int(n) for _, n in sums)
  want = sum(float(s) for s, _ in sums) / tokens
  np.testing.assert_allclose(loss["eval/loss"], want, rtol=1e-6)
  np.testing.assert_allclose(loss["eval/perplexity"], np.exp(want), rtol=1e-6)
  # Byte ids are one byte each, BOS (256) and EOS (257) none.
  n_bytes = sum(int(np.sum(np.asarray(b)[:, 1:] < 256)) for b in batches)
  assert 0 < n_bytes < tokens
  np.testing.assert_allclose(
      loss["eval/bits_per_byte"], want / math.log(2) * tokens / n_bytes, rtol=1e-6
  )
  assert usage["memory/tokens"] == 3 * 2 * 8
  assert 0 < usage["memory/layer1/coverage"] <= 1


def test_without_eval_batches_the_loss_and_usage_evals_report_nothing():
  cfg = small_config()
  ctx = evaluation.EvalContext(
      types.SimpleNamespace(params=None, other=None), eval_step=None, batches=[],
      memory=cfg.model.memory,
  )
  loss = evaluation.HeldOutLoss(data.make_tokenizer("bytes"))
  assert loss(ctx) == {} and evaluation.SlotUsage()(ctx) == {}


DOCS = ["Hello, world!", " a leading space", "Grüße aus Köln — naïve café", "東京 🙂 Ωμέγα\n", "x"]


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
  """A tiny SentencePiece model (byte fallback, the default dummy prefix) and a tiny tiktoken
  ranks file, made here."""
  import sentencepiece as spm

  root = tmp_path_factory.mktemp("tokenizers")
  (root / "corpus.txt").write_text("\n".join(["the cat sat on the mat", "Hello, world!"] * 20))
  spm.SentencePieceTrainer.train(
      input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=300,
      model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2,
  )
  tokens = [bytes([b]) for b in range(256)] + [b"th", b"the", b" t", b" the", "ü".encode()]
  (root / "ranks.tiktoken").write_text(
      "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens))
  )
  return {"sentencepiece": root / "sp.model", "tiktoken": root / "ranks.tiktoken"}


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece", "tiktoken"])
def test_bits_per_byte_divides_by_the_bytes_of_the_decoded_target_text(kind, tokenizer_files):
  tokenizer = data.make_tokenizer(kind, str(tokenizer_files[kind]) if kind != "bytes" else None)
  # Documents packed as training packs them, then cut into (B, T + 1) rows that overlap by one
  # token, so each token after the first is a target once; padding (EOS) closes the last row.
  bos, eos = tokenizer.bos_id, tokenizer.eos_id
  stream = [i for doc in DOCS for i in (bos, *tokenizer.encode(doc), eos)]
  width = 9
  stream += [eos] * (-(len(stream) - 1) % (width - 1))
  rows = np.asarray([stream[i : i + width] for i in range(0, len(stream) - 1, width - 1)])
  ctx = types.SimpleNamespace(
      heldout=evaluation.HeldOutPass(loss_sum=10.0, tokens=rows[:, 1:].size, usage=None),
      batches=[jnp.asarray(rows[:2]), jnp.asarray(rows[2:])],
  )
  metrics = evaluation.HeldOutLoss(tokenizer)(ctx)
  n_bytes = sum(len(tokenizer.decode(tokenizer.encode(doc)).encode()) for doc in DOCS)
  if kind != "sentencepiece":  # whose default rules fold spaces: it counts the decoded text
    assert n_bytes == sum(len(doc.encode()) for doc in DOCS)
  np.testing.assert_allclose(metrics["eval/bits_per_byte"], 10.0 / math.log(2) / n_bytes)


def test_a_tokenizers_byte_table_gives_specials_no_bytes(tokenizer_files):
  sp = data.make_tokenizer("sentencepiece", str(tokenizer_files["sentencepiece"]))
  lengths_2W = sp.byte_lengths()
  assert lengths_2W.shape == (2, sp.vocab_size)
  assert lengths_2W[:, [sp.bos_id, sp.eos_id]].sum() == 0
  (the,) = sp.encode("the")  # "\u2581the": a space and three letters, the space dropped first
  assert list(lengths_2W[:, the]) == [4, 3]
  assert data.make_tokenizer("bytes").byte_lengths()[:, 255:].tolist() == [[1, 0, 0], [1, 0, 0]]


def test_each_eval_prints_its_lines_and_summary_part_as_the_log_reads_them():
  loss = evaluation.HeldOutLoss(data.make_tokenizer("bytes"))
  metrics = {"eval/loss": 1.23456, "eval/perplexity": 3.4368, "eval/bits_per_byte": 1.78109}
  assert loss.lines(metrics) == ["eval loss 1.2346 (perplexity 3.44, 1.7811 bits per byte)"]
  assert loss.summary(metrics) == "eval loss 1.2346 (1.7811 bits/byte)"
  del metrics["eval/bits_per_byte"]  # eval text of special tokens only
  assert loss.lines(metrics) == ["eval loss 1.2346 (perplexity 3.44)"]
  assert loss.summary(metrics) == "eval loss 1.2346"

  recall = evaluation.FactRecall(None, [], None, chance={}, max_len=8)
  metrics = {"recall/all": 0.5, "recall/chance": 0.1, "recall/birth_city": 0.25, "recall/major": 1.0}
  assert recall.lines(metrics) == [
      "fact recall 50.0% (chance 10.0%); birth_city 25%, major 100%"
  ]
  assert recall.summary(metrics) == "fact recall 50.0% (chance 10.0%)"

  usage = evaluation.SlotUsage()
  metrics = {"memory/tokens": 64.0, "memory/layer1/coverage": 0.5,
             "memory/layer1/gini_count": 0.25, "memory/layer1/head0/coverage": 0.4}
  assert usage.lines(metrics) == ["memory: layer1/coverage 0.5, layer1/gini_count 0.25"]
  assert usage.summary(metrics) == ""

  for ev in (loss, recall, usage):  # an eval that had nothing to measure prints nothing
    assert ev.lines({}) == [] and ev.summary({}) == ""
