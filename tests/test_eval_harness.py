"""Downstream evaluation with lm-evaluation-harness: a small trained run on two local tasks, the
adapter's log-likelihoods against the model's logits, the QA metrics (exact match, F1, answer
NLL) by hand and through the command, memjax's own task files, the command line and its errors."""

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
QA_NLL_TASK = str(TASKS / "memjax_qa_nll.yaml")

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
  assert {"exact_match,remove_whitespace", "f1,remove_whitespace"} <= set(metrics["memjax_qa"])
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
  assert harness.main([
      str(run_dir), "--tasks", ",".join(LOCAL_TASKS), "--limit", "3", "--batch-size", "4",
      "--output", str(output),
  ]) == 0
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
    "text, normalised",
    [
        ("The  Sun!", "sun"),
        ("An apple, a day", "apple day"),
        ("Theater of the absurd", "theater of absurd"),  # articles as whole words only
        ("U.S.A.", "usa"),
        (" Rock-'n'-roll\t\n", "rocknroll"),
        ("the-end", "theend"),  # punctuation goes first, as in SQuAD
        ("A", ""),
        ("Élan «vital»", "élan «vital»"),  # Unicode letters lowercased, only ASCII punctuation
    ],
)
def test_answers_are_normalised_as_squad_normalises_them(text, normalised):
  assert harness.normalise_answer(text) == normalised


def test_exact_match_and_f1_take_the_best_of_the_gold_answers():
  # "eiffel tower in paris" against "eiffel tower": P 2/4, R 2/2; against "paris": P 1/4, R 1/1.
  scores = harness.qa_scores("the Eiffel Tower in Paris", ["Eiffel Tower", "Paris"])
  assert scores == {"exact_match": 0.0, "f1": pytest.approx(2 / 3)}
  assert harness.answer_f1("the Eiffel Tower in Paris", "Paris") == pytest.approx(0.4)
  assert harness.qa_scores("Paris.", ["City of Light", "paris"]) == {"exact_match": 1.0, "f1": 1.0}
  # Shared words count as often as both answers have them: "new" once, "york" once; P 2/3, R 1.
  assert harness.answer_f1("new new york", "New York") == pytest.approx(0.8)
  assert harness.qa_scores("sky blue", "blue sky") == {"exact_match": 0.0, "f1": 1.0}
  assert harness.qa_scores("The", ["the"]) == {"exact_match": 1.0, "f1": 1.0}  # both empty
  assert harness.qa_scores("", ["blue"]) == {"exact_match": 0.0, "f1": 0.0}
  with pytest.raises(ValueError, match="at least one gold answer"):
    harness.qa_scores("blue", [])


# What the fake generation answers to each memjax_qa question, and the scores by hand.
ANSWERS = {
    "What color is the sky": " The blue sky",  # EM 0 ("blue sky"); F1 1 against "sky blue"
    "How many legs has a dog": " 4",  # EM 1 against the alias "4"
    "What do bees make": " honey and wax",  # EM 0; F1: P 1/3, R 1: 0.5
    "What is frozen water": " Ice!",  # EM 1
    "Which star lights the day": " the sun",  # EM 1 against "the Sun"
}


def test_the_command_scores_exact_match_f1_and_answer_nll_as_computed_by_hand(
    lm, run_dir, tmp_path, monkeypatch
):
  def generate_until(self, requests, disable_tqdm=False):
    questions = [request.args[0].removeprefix("Q: ").removesuffix("?\nA:") for request in requests]
    return [ANSWERS[q] for q in questions]

  monkeypatch.setattr(harness.MemjaxLM, "generate_until", generate_until)
  output = tmp_path / "qa.json"
  assert harness.main([
      str(run_dir), "--tasks", f"{LOCAL_TASKS[1]},{QA_NLL_TASK}", "--output", str(output)
  ]) == 0
  metrics = task_metrics(json.loads(output.read_text()))
  assert metrics["memjax_qa"]["exact_match,remove_whitespace"] == pytest.approx(3 / 5)
  assert metrics["memjax_qa"]["f1,remove_whitespace"] == pytest.approx((1 + 1 + 0.5 + 1 + 1) / 5)
  # The answer NLL: the first answer after its question, as the adapter scores any request.
  docs = [json.loads(line) for line in (TASKS / "memjax_qa.jsonl").read_text().splitlines()]
  requests = [Request((f"Q: {d['question']}?\nA:", f" {d['answers'][0]}")) for d in docs]
  want = -np.mean([logp for logp, _ in lm.loglikelihood(requests, disable_tqdm=True)])
  assert want > 0
  assert metrics["memjax_qa_nll"]["answer_nll,none"] == pytest.approx(want, rel=1e-4)


def test_memjax_nq_open_files_prompt_as_nq_open_and_score_the_first_answer(
    lm, tmp_path, monkeypatch
):
  # The task files over local rows shaped as the Hub's nq_open; lm-eval draws the shot from two
  # train rows (alike: the prompt is the same whichever it draws).
  shot = {"question": "who wrote hamlet", "answer": ["Shakespeare", "W. Shakespeare"]}
  rows = {
      "train": [shot, shot],
      "validation": [{"question": "what is the capital of france", "answer": ["Paris"]}],
  }
  files = {}
  for split, docs in rows.items():
    files[split] = tmp_path / f"{split}.jsonl"
    files[split].write_text("".join(json.dumps(d) + "\n" for d in docs))
  tasks = []
  for name in ("nq_open_memjax", "nq_open_answer_nll"):
    tasks.append(tmp_path / f"local_{name}.yaml")
    tasks[-1].write_text(
        f"include: {harness.TASKS_DIR / name}.yaml\ntask: local_{name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    train: {files['train']}\n"
        f"    validation: {files['validation']}\n"
    )
  seen = {}

  def generate_until(self, requests, disable_tqdm=False):
    seen["generate"] = [request.args[0] for request in requests]
    return [" the city of Paris"]

  def loglikelihood(self, requests, disable_tqdm=False):
    seen["loglikelihood"] = [request.args for request in requests]
    return [(-1.5, False)]

  monkeypatch.setattr(harness.MemjaxLM, "generate_until", generate_until)
  monkeypatch.setattr(harness.MemjaxLM, "loglikelihood", loglikelihood)
  results = harness.evaluate(lm, [str(t) for t in tasks], num_fewshot=1)
  prompt = (
      "Answer these questions:\n\nQ: who wrote hamlet?\nA: Shakespeare\n"
      "Q: what is the capital of france?\nA:"
  )
  assert seen == {"generate": [prompt], "loglikelihood": [(prompt, " Paris")]}
  metrics = task_metrics(results)
  # "city of paris" against "paris": P 1/3, R 1.
  assert metrics["local_nq_open_memjax"] == {
      "exact_match,remove_whitespace": 0.0, "f1,remove_whitespace": pytest.approx(0.5)}
  assert metrics["local_nq_open_answer_nll"] == {"answer_nll,none": 1.5}


def test_memjax_task_files_are_found_by_name_and_score_their_datasets_answers():
  from lm_eval.tasks._yaml_loader import load_yaml  # what TaskManager reads task files with

  manager, names = harness.task_manager(["nq_open_memjax", "triviaqa_answer_nll"])
  assert names == ["nq_open_memjax", "triviaqa_answer_nll"]
  tasks = {p.stem: load_yaml(p) for p in harness.TASKS_DIR.glob("*.yaml")}
  assert set(tasks) <= set(manager.all_tasks)
  assert all(config["task"] == name for name, config in tasks.items())  # files named as tasks
  assert set(tasks) == {
      "nq_open_memjax", "triviaqa_memjax", "nq_open_answer_nll", "triviaqa_answer_nll"
  }
  # Rows shaped as the Hub's nq_open and trivia_qa (rc.nocontext) rows.
  nq = {"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]}
  trivia = {"question": "Which planet is red?",
            "answer": {"value": "Mars", "aliases": ["Mars", "The Red Planet"]}}
  assert tasks["nq_open_memjax"]["process_results"](nq, ["shakespeare"]) == {
      "exact_match": 1.0, "f1": 1.0}
  assert tasks["triviaqa_memjax"]["process_results"](trivia, ["red planet earth"]) == {
      "exact_match": 0.0, "f1": pytest.approx(0.8)}
  for name in ("nq_open_answer_nll", "triviaqa_answer_nll"):
    assert tasks[name]["process_results"](nq, [(-2.5, False)]) == {"answer_nll": 2.5}
    assert tasks[name]["output_type"] == "loglikelihood"


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
  assert harness.main([path, "--tasks", tasks]) == 2
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1, err
  assert re.search(message.replace("(s)", r"\(s\)"), err), err
