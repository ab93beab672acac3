"""The evals a run schedules: which a run gets, one shared forward pass per evaluation, and the
lines and summary parts they print."""

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
  loss = evaluation.HeldOutLoss()(ctx)
  usage = evaluation.SlotUsage()(ctx)
  assert len(calls) == 3  # once per batch, for both evals
  sums = [jitted(params, other, b)[:2] for b in batches]
  want = sum(float(s) for s, _ in sums) / sum(int(n) for _, n in sums)
  np.testing.assert_allclose(loss["eval/loss"], want, rtol=1e-6)
  np.testing.assert_allclose(loss["eval/perplexity"], np.exp(want), rtol=1e-6)
  assert usage["memory/tokens"] == 3 * 2 * 8
  assert 0 < usage["memory/layer1/coverage"] <= 1


def test_without_eval_batches_the_loss_and_usage_evals_report_nothing():
  cfg = small_config()
  ctx = evaluation.EvalContext(
      types.SimpleNamespace(params=None, other=None), eval_step=None, batches=[],
      memory=cfg.model.memory,
  )
  assert evaluation.HeldOutLoss()(ctx) == {} and evaluation.SlotUsage()(ctx) == {}


def test_each_eval_prints_its_lines_and_summary_part_as_the_log_reads_them():
  loss = evaluation.HeldOutLoss()
  metrics = {"eval/loss": 1.23456, "eval/perplexity": 3.4368}
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
