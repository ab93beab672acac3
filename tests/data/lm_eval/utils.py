"""process_results of the local QA tasks beside this file: memjax's QA metrics on the JSONL's
`answers`. lm-eval loads this file by path (`!function utils.NAME`)."""

from memjax.evaluation_harness import answer_nll, qa_scores

__all__ = ["answer_nll", "qa_results"]


def qa_results(doc: dict, results: list[str]) -> dict[str, float]:
  return qa_scores(results[0], doc["answers"])
