"""lm-eval task files: the paper's NaturalQuestions and TriviaQA scored with memjax's QA metrics.

`python -m memjax.eval` indexes this folder, so its tasks go by name (`--tasks nq_open_memjax`).
Their data comes from the Hugging Face Hub, as for lm-eval's own nq_open and triviaqa, whose
prompts, splits and generation settings they keep:

- nq_open_memjax, triviaqa_memjax: the generated answer's SQuAD-normalised exact match and word
  F1, each the best over the gold answers (`memjax.evaluation_harness.qa_scores`).
- nq_open_answer_nll, triviaqa_answer_nll: the negative log-likelihood of the first gold answer
  (TriviaQA: its canonical value) given the question, in nats (`answer_nll`).

`utils.py` is loaded by lm-eval from beside the files (`!function utils.NAME`).
"""
