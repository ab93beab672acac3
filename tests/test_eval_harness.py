"""Downstream evaluation with lm-evaluation-harness: a small trained run on two local tasks, the
adapter's log-likelihoods against the model's logits, the command line and its errors."""

import json
import os
import pathlib
import re
import subprocess
import sys

# lm-eval reads task data through `datasets`, which reads these when first imported: nothing
# may be fetched from the Hub, and its cache stays out of the home directory.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from memjax import evaluation_harness as harness  # noqa: E402
from memjax.model import split_for_inference  # noqa: E402
from memjax.training import loop  # noqa: E402

from support.training import smoke_config  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "lm_eval"
LOCAL_TASKS = [str(TASKS / "memjax_choice.yaml"), str(TASKS / "memjax_qa.yaml")]

pytestmark = pytest.mark.usefixtures("fast_compile_module", "in_repo_root", "hf_cache")


@pytest.fixture
def in_repo_root(monkeypatch):
  """The local tasks name their data files relative to the repository root."""
  monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
  """`datasets`' cache of the local task data, in a temporary folder."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
    yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir, fast_compile_module):
  """A memory model trained for a few steps, with its checkpoint."""
  del fast_compile_module
  cfg = smoke_config(
      data_dir, "train.steps=3", "train.eval_every=100", "train.checkpoint_every=3"
  )
  path = tmp_path_factory.mktemp("eval_run")
  loop.run(cfg, path, log=lambda _: None)
  return path


@pytest.fixture(scope="module")
def lm(run_dir):
  _, model, tokenizer, mesh = harness.load_run(run_dir)
  return harness.MemjaxLM(model, tokenizer, mesh, batch_size=8)


class Request:
  """What the adapter reads of an lm-eval Instance."""

  def __init__(self, args: tuple):
    self.args = args


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
  """task -> its numeric metrics, standard errors left out."""
  return {
      task: {
          k: v for k, v in metrics.items()
          if "stderr" not in k and isinstance(v, float)
      }
      for task, metrics in results["results"].items()
  }


def test_a_trained_run_is_evaluated_on_a_multiple_choice_and_a_generation_task(lm):
  assert lm.mesh.size == jax.device_count() == 8  # batches split over the 8 CPU devices
  results = harness.evaluate(lm, LOCAL_TASKS)
  metrics = task_metrics(results)
  assert set(metrics) == {"memjax_choice", "memjax_qa"}
  assert {"acc,none", "acc_norm,none"} <= set(metrics["memjax_choice"])
  assert "exact_match,remove_whitespace" in metrics["memjax_qa"]
  for task, values in metrics.items():
    assert values and all(0 <= v <= 1 for v in values.values()), (task, values)
  assert results["n-samples"]["memjax_choice"]["effective"] == 6
  assert "memjax_choice" in harness.metrics_table(results)


def test_loglikelihood_equals_the_log_softmax_of_the_models_logits(lm):
  tokenizer = lm.tokenizer
  pairs = [("Ice is", " cold"), ("A cat says", " meow, and it purrs")]
  scores = lm.loglikelihood([Request(pair) for pair in pairs], disable_tqdm=True)

  graphdef, state = split_for_inference(lm.model)
  forward = jax.jit(lambda state, tokens_BT: nnx.merge(graphdef, state)(tokens_BT))
  for (context, continuation), (logp, greedy) in zip(pairs, scores):
    ctx = [tokenizer.bos_id, *tokenizer.encode(context)]
    cont = tokenizer.encode(continuation)
    tokens = jnp.asarray([ctx + cont])  # one row, unpadded
    with jax.set_mesh(lm.mesh):
      logits_TW = forward(state, tokens[:, :-1])[0].astype(jnp.float32)
    logp_TW = np.asarray(jax.nn.log_softmax(logits_TW, axis=-1))
    positions = np.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    expected = logp_TW[positions, cont].sum()
    np.testing.assert_allclose(logp, expected, rtol=1e-4)
    assert greedy == bool(np.all(logp_TW[positions].argmax(-1) == cont))


def test_rolling_loglikelihood_scores_each_token_once_in_windows_of_max_seqlen(lm):
  text = "Ada was born in Lisbon. " * 5
  ids, s = lm.tokenizer.encode(text), lm.max_seqlen
  assert s < len(ids) <= 2 * s  # two windows
  (rolling,) = lm.loglikelihood_rolling([Request((text,))], disable_tqdm=True)
  # The first window predicts s tokens from BOS on; the last predicts the rest, its input the
  # s tokens before the document's end.
  windows = [([lm.tokenizer.bos_id], ids[:s]), (ids[len(ids) - s - 1 : s], ids[s:])]
  assert rolling == pytest.approx(sum(logp for logp, _ in lm.score_pairs(windows)), rel=1e-5)


def test_generation_stops_at_the_until_strings(lm):
  request = Request(("Q: What do bees make?\nA:", {"max_gen_toks": 12}))
  (free,) = lm.generate_until([request], disable_tqdm=True)
  assert 0 < len(free) <= 12  # characters: at most one per byte
  cut_at = free[len(free) // 2]
  request.args = (request.args[0], {"max_gen_toks": 12, "until": [cut_at]})
  (cut,) = lm.generate_until([request], disable_tqdm=True)
  assert cut == free[: free.index(cut_at)]


def test_the_command_prints_and_writes_per_task_metrics(run_dir, tmp_path, capsys):
  output = tmp_path / "results" / "eval.json"
  harness.main([
      str(run_dir), "--tasks", ",".join(LOCAL_TASKS), "--limit", "3", "--batch-size", "4",
      "--output", str(output),
  ])
  printed = capsys.readouterr().out
  assert "memjax_choice" in printed and "memjax_qa" in printed and "exact_match" in printed
  written = json.loads(output.read_text())
  metrics = task_metrics(written)
  assert set(metrics) == {"memjax_choice", "memjax_qa"}
  assert all(0 <= v <= 1 for values in metrics.values() for v in values.values())
  # The module entry point.
  usage = subprocess.run(
      [sys.executable, "-m", "memjax.eval", "--help"], capture_output=True, text=True, check=True
  ).stdout
  assert usage.startswith("usage: python -m memjax.eval") and "--num-fewshot" in usage


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing run", "not a memjax run directory"),
        ("unknown task", "unknown lm-eval task(s) no_such_task"),
        ("missing task file", "task file .*nothing.yaml does not exist"),
    ],
)
def test_bad_input_gives_one_clear_error(case, message, run_dir, tmp_path, capsys):
  path, tasks = str(run_dir), LOCAL_TASKS[0]
  if case == "missing run":
    path = str(tmp_path / "no_run")
  elif case == "unknown task":
    tasks = f"{LOCAL_TASKS[0]},no_such_task"
  else:
    tasks = str(tmp_path / "nothing.yaml")
  with pytest.raises(SystemExit) as exit_info:
    harness.main([path, "--tasks", tasks])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1, err
  assert re.search(message.replace("(s)", r"\(s\)"), err), err
