"""process_results of the task files beside this one: each passes its dataset's gold answers to
memjax's QA metrics. lm-eval loads this file by path (`!function utils.NAME`)."""

from memjax.evaluation_harness import answer_nll, qa_scores

__all__ = ["answer_nll", "nq_open_scores", "triviaqa_scores"]


def nq_open_scores(doc: dict, results: list[str]) -> dict[str, float]:
  return qa_scores(results[0], doc["answer"])


def triviaqa_scores(doc: dict, results: list[str]) -> dict[str, float]:
  return qa_scores(results[0], doc["answer"]["aliases"])
