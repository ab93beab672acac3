"""Downstream evaluation of a trained run with EleutherAI's lm-evaluation-harness (`lm_eval`).

`python -m memjax.eval <run dir> --tasks hellaswag,piqa,nq_open --num-fewshot 5` restores the
run's newest checkpoint onto the run's mesh over this machine's devices, evaluates it through
`MemjaxLM` and prints a metrics table per task (and writes JSON with `--output`). Tasks are
lm-eval's names or paths of local task YAML files.

`MemjaxLM` serves the harness's three request types from one model:

- loglikelihood: rows [BOS] + context + continuation, sorted by length and cut into batches of
  `batch_size` rows, each padded to a power-of-two width: one jitted forward per width, which
  returns each row's continuation log-prob sum and whether greedy decoding would produce it
  (the (B, T, W) logits never leave the devices).
- loglikelihood_rolling: lm-eval's rolling windows of `model.max_seqlen` tokens, scored as
  loglikelihood rows and summed per document.
- generate_until: `memjax.generate` over batches of prompts that share their generation settings,
  each cut at the first of its `until` strings.

Batches are padded to a multiple of the device count (repeats of the last row, dropped from the
results), so the rows and the memory layers' lookups split evenly over the mesh. One process;
a multi-host run is not served.

The paper's question-answering metrics, for task files' `process_results` (lm-eval's nq_open and
triviaqa score exact match only, each with its own normalisation, and no F1 or answer NLL):
`qa_scores` gives SQuAD-normalised exact match and word F1, each the best over the gold answers;
`answer_nll` gives -log p(gold answer | question) from a loglikelihood request, Figure 1's
answer NLL. `memjax/lm_eval_tasks/` holds nq_open and triviaqa scored with them, found by name.

Axis letters (see memjax): B batch, T time, W vocabulary.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import pathlib
import re
import string
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from memjax import checkpoint, data, generate, paths, sharding
from memjax.cli import InputError, entry_point, reading
from memjax.model import Transformer, split_for_inference


class MemjaxLM(TemplateLM):
  """An `lm_eval` model for a memjax `Transformer` and its run's tokenizer.

  Args:
    model: the language model, its arrays placed on `mesh` (`load_run` does so).
    tokenizer: the run's tokenizer (`memjax.data.make_tokenizer`); rows start with its BOS, as
      training documents do.
    mesh: the devices the batches are split over; the model's memory layers read it too.
    batch_size: rows per forward or generation batch, rounded up to a multiple of the devices.
  """

  def __init__(
      self, model: Transformer, tokenizer: data.Tokenizer, mesh: jax.sharding.Mesh, *,
      batch_size: int = 32,
  ):
    super().__init__()
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
    self.max_seqlen = model.cfg.max_seqlen
    self.batch_size = -(-batch_size // mesh.size) * mesh.size
    graphdef, state = split_for_inference(model)
    self._state = state
    self._score = jax.jit(
        functools.partial(_continuation_scores, graphdef), out_shardings=sharding.replicated(mesh)
    )

  # TemplateLM's hooks: it tokenizes (context, continuation) pairs and calls
  # _loglikelihood_tokens.

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    return self.tokenizer.bos_id

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    del kwargs
    ids = self.tokenizer.encode(string)
    return [self.tokenizer.bos_id, *ids] if add_special_tokens else ids

  def tok_decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(ids)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    """(log-prob sum, is greedy) of each request's continuation ids given its context ids."""
    bos = self.tokenizer.bos_id
    pairs = [
        (ctx if ctx[:1] == [bos] else [bos, *ctx], cont) for _, ctx, cont in requests
    ]
    return self.score_pairs(pairs, disable_tqdm=disable_tqdm)

  def score_pairs(
      self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, disable_tqdm: bool = True
  ) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether each continuation token is the argmax) for
    (context ids, continuation ids) pairs, as given (no BOS added). A row longer than
    max_seqlen + 1 keeps its last max_seqlen + 1 tokens, as lm-eval's models do."""
    for i, (ctx, cont) in enumerate(pairs):
      if not ctx or not cont:
        raise ValueError(f"pair {i}: context and continuation must both be non-empty")
    rows = [[*ctx, *cont][-(self.max_seqlen + 1) :] for ctx, cont in pairs]
    # Longest first: a batch's rows have similar lengths, and an out-of-memory shows at once.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    batches = range(0, len(order), self.batch_size)
    for start in tqdm(batches, desc="loglikelihood", disable=disable_tqdm):
      chunk = order[start : start + self.batch_size]
      width = _bucket(max(len(rows[i]) for i in chunk) - 1, self.max_seqlen)
      inputs_BT = np.zeros((self.batch_size, width), np.int32)
      targets_BT = np.zeros((self.batch_size, width), np.int32)
      mask_BT = np.zeros((self.batch_size, width), bool)
      for r, i in enumerate(chunk):
        row, n_cont = rows[i], min(len(pairs[i][1]), len(rows[i]) - 1)
        inputs_BT[r, : len(row) - 1] = row[:-1]
        targets_BT[r, : len(row) - 1] = row[1:]
        mask_BT[r, len(row) - 1 - n_cont : len(row) - 1] = True
      batch = jax.device_put((inputs_BT, targets_BT, mask_BT), sharding.batch_sharding(self.mesh))
      with jax.set_mesh(self.mesh):
        logp_B, greedy_B = jax.device_get(self._score(self._state, *batch))
      for r, i in enumerate(chunk):
        results[i] = (float(logp_B[r]), bool(greedy_B[r]))
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each document's log-likelihood over windows of max_seqlen tokens, each token predicted
    once, the first from BOS."""
    pairs, owner = [], []
    for i, request in enumerate(requests):
      (text,) = request.args
      windows = lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.tokenizer.bos_id,
          max_seq_len=self.max_seqlen, context_len=1,
      )
      for window in map(lm_utils.make_disjoint_window, windows):
        pairs.append(window)
        owner.append(i)
    scores = self.score_pairs(pairs, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for i, (logp, _) in zip(owner, scores):
      totals[i] += logp
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Each request's continuation of its context, cut before the first of its `until` strings;
    greedy unless it asks for `do_sample` with a temperature above 0."""
    groups = collections.defaultdict(list)  # same settings, same compiled decode
    for i, request in enumerate(requests):
      _, kwargs = request.args
      groups[json.dumps(kwargs, sort_keys=True, default=str)].append(i)
    out = [""] * len(requests)
    bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
    for key, members in groups.items():
      kwargs = json.loads(key)
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = min(int(kwargs.pop("max_gen_toks", 256)), self.max_seqlen - 1)
      temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
      top_p = float(kwargs.pop("top_p", 1.0))
      prompts = {
          i: [self.tokenizer.bos_id, *self.tok_encode(requests[i].args[0])][
              -(self.max_seqlen - max_new) :
          ]
          for i in members
      }
      members.sort(key=lambda i: -len(prompts[i]))
      for start in range(0, len(members), self.batch_size):
        chunk = members[start : start + self.batch_size]
        batch = [prompts[i] for i in chunk]
        batch += [batch[-1]] * (-len(batch) % self.mesh.size)
        with jax.set_mesh(self.mesh):
          rows = generate.generate(
              self.model, batch, max_new_tokens=max_new, temperature=temperature, top_p=top_p,
              eos_id=self.tokenizer.eos_id, rng=jax.random.key(start),
          )
        for i, row in zip(chunk, rows):
          out[i] = _cut(self.tokenizer.decode(row), until)
        bar.update(len(chunk))
    bar.close()
    return out


def _continuation_scores(graphdef, state, inputs_BT, targets_BT, mask_BT):
  """Per row, the summed log-prob of the masked targets and whether each is the argmax."""
  logits_BTW = nnx.merge(graphdef, state)(inputs_BT).astype(jnp.float32)
  logp_BTW = jax.nn.log_softmax(logits_BTW, axis=-1)
  target_logp_BT = jnp.take_along_axis(logp_BTW, targets_BT[..., None], axis=-1)[..., 0]
  logp_B = jnp.sum(jnp.where(mask_BT, target_logp_BT, 0.0), axis=-1)
  hit_BT = jnp.argmax(logits_BTW, axis=-1) == targets_BT
  return logp_B, jnp.all(hit_BT | ~mask_BT, axis=-1)


def _bucket(n: int, cap: int) -> int:
  """A power of two >= n (at least 8, at most `cap`): a few widths, so a few compiles."""
  return min(max(8, 1 << (n - 1).bit_length()), cap)


def _cut(text: str, until: Sequence[str]) -> str:
  """`text` up to the first occurrence of any of `until`."""
  ends = [text.find(s) for s in until if s and s in text]
  return text[: min(ends)] if ends else text


# ----------------------------------------------------------------------------------------------
# Question-answering metrics. A task file's `process_results: !function utils.NAME` calls them
# through a utils.py beside it that passes its dataset's gold answers.

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise_answer(text: str) -> str:
  """SQuAD's normalisation: lowercased, ASCII punctuation deleted, the articles a, an and the
  dropped, words joined by single spaces."""
  return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def answer_f1(prediction: str, gold: str) -> float:
  """F1 of the normalised answers' words (a word shared as often as both have it); 1 when both
  normalise to nothing, 0 when one does."""
  pred, ref = normalise_answer(prediction).split(), normalise_answer(gold).split()
  if not pred or not ref:
    return float(pred == ref)
  shared = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if not shared:
    return 0.0
  precision, recall = shared / len(pred), shared / len(ref)
  return 2 * precision * recall / (precision + recall)


def qa_scores(prediction: str, golds: str | Sequence[str]) -> dict[str, float]:
  """`exact_match` and `f1` of a generated answer against the gold answers (TriviaQA's aliases,
  NQ's answers): each the best over them, as TriviaQA and NQ score."""
  golds = [golds] if isinstance(golds, str) else list(golds)
  if not golds:
    raise ValueError("a question needs at least one gold answer")
  pred = normalise_answer(prediction)
  return {
      "exact_match": max(float(pred == normalise_answer(gold)) for gold in golds),
      "f1": max(answer_f1(prediction, gold) for gold in golds),
  }


def answer_nll(doc: dict, results: Sequence[tuple[float, bool]]) -> dict[str, float]:
  """`process_results` of a loglikelihood task whose continuation is the gold answer: its
  negative log-likelihood given the question, summed over its tokens, in nats."""
  del doc
  ((logp, _),) = results
  return {"answer_nll": -logp}


# ----------------------------------------------------------------------------------------------
# Loading a run, running tasks, the command line.


def load_run(path: epath.PathLike):
  """(config, model, tokenizer, mesh) of a run dir's newest checkpoint (or a checkpoint step's
  directory; local or gs://), restored straight into its shardings on the run's mesh over this machine's
  devices."""
  cfg, model, tokenizer = checkpoint.load_for_inference(path, on_run_mesh=True)
  return cfg, model, tokenizer, sharding.make_mesh(cfg.mesh)


# memjax's task files: the paper's QA tasks with the metrics above.
TASKS_DIR = pathlib.Path(__file__).resolve().parent / "lm_eval_tasks"


def task_manager(tasks: Sequence[str]):
  """An lm-eval TaskManager that knows `tasks` (names, or paths of task YAML files, whose
  folders it indexes; memjax's `TASKS_DIR` always), and the task names to ask it for. Raises
  InputError naming the unknown."""
  from lm_eval.tasks import TaskManager

  names, folders = [], [str(TASKS_DIR)]
  for task in tasks:
    if task.endswith((".yaml", ".yml")):
      path = pathlib.Path(task)
      if not path.is_file():
        raise InputError(f"task file {task} does not exist")
      if str(path.resolve().parent) not in folders:
        folders.append(str(path.resolve().parent))
      names.append(str(path.resolve()))
    else:
      names.append(task)
  # Indexing lm-eval's own thousands of task files takes seconds: only when a name needs it.
  ours = {path.stem for path in TASKS_DIR.glob("*.yaml")}  # each file is named as its task
  needs_defaults = any(not n.endswith((".yaml", ".yml")) and n not in ours for n in names)
  manager = TaskManager(include_path=folders, include_defaults=needs_defaults)
  unknown = [n for n in names if not n.endswith((".yaml", ".yml")) and n not in manager.all_tasks]
  if unknown:
    raise InputError(
        f"unknown lm-eval task(s) {', '.join(unknown)}: give task, group or tag names that "
        "`lm-eval ls tasks` lists, or paths of task .yaml files"
    )
  return manager, names


def evaluate(
    lm: MemjaxLM, tasks: Sequence[str], *, num_fewshot: int | None = None,
    limit: int | float | None = None, manager=None,
) -> dict[str, Any]:
  """lm-eval's results for `tasks` (see `task_manager`): metrics under "results"."""
  from lm_eval import evaluator

  if manager is None:
    manager, tasks = task_manager(tasks)
  return evaluator.simple_evaluate(
      model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
      log_samples=False, torch_random_seed=None,  # no torch import for a seed nothing reads
  )


def metrics_table(results: dict[str, Any]) -> str:
  """lm-eval's markdown table of every task's metrics (and of groups, where asked for)."""
  table = lm_utils.make_table(results)
  if results.get("groups"):
    table += "\n" + lm_utils.make_table(results, "groups")
  return table


@entry_point
def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m memjax.eval",
      description="Evaluate a memjax run's newest checkpoint on lm-evaluation-harness tasks.",
  )
  parser.add_argument("path", help="run directory, its checkpoints/ or one checkpoint step")
  parser.add_argument(
      "--tasks", required=True,
      help="comma-separated lm-eval task names (hellaswag,piqa,nq_open) or task .yaml paths",
  )
  parser.add_argument("--num-fewshot", type=int, default=None, help="default: each task's own")
  parser.add_argument("--limit", type=float, default=None, help="examples per task (testing)")
  parser.add_argument("--batch-size", type=int, default=32, help="rows per batch")
  parser.add_argument(
      "--output", type=epath.Path, default=None, help="results JSON file (local or gs://)"
  )
  args = parser.parse_args(argv)
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
  # Tasks are checked before the checkpoint is read: a typo costs no restore.
  manager, names = task_manager(tasks)
  with reading(f"the checkpoint at {args.path}"):
    _, model, tokenizer, mesh = load_run(args.path)
  lm = MemjaxLM(model, tokenizer, mesh, batch_size=args.batch_size)
  results = evaluate(lm, names, num_fewshot=args.num_fewshot, limit=limit, manager=manager)
  print(metrics_table(results), flush=True)
  if args.output is not None:
    if not paths.is_remote(args.output):  # an object store has no folders
      args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(results, indent=2, default=lm_utils.handle_non_serializable) + "\n"
    )
    print(f"wrote {args.output}", file=sys.stderr)
