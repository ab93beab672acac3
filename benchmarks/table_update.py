"""Dense against sparse table updates: the knowledge benchmark's Memory+ model trained with
`optim.table_update=dense` (the reference's AdamW over every row) and `sparse` (the rows a step
reads), at the same settings, with a sweep of the table's learning rate for `sparse`.

  python benchmarks/table_update.py [--json FILE] [--smoke] [--steps N] [--n-keys 64 256]
                                    [--updates dense sparse] [--value-lrs 0.003 0.01 0.03]
                                    [--seeds 0]

The model and run are benchmarks/knowledge.py's Memory+ d128 (configs/tiny.yaml's recipe, 400
steps of 16 x 128 bytes on 60 people). Its 64^2-slot table is read almost whole by every step, so
there the two updates nearly coincide; a 256^2-slot table, of which a step reads a fraction, is
where they part. Each row is one training run, scored by its final eval (held-out loss, greedy
recall of every fact probe).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.knowledge import (  # noqa: E402
    DEFAULT_RUN, MEMORY, SMOKE_BASE, SMOKE_RUN, run_budget, run_model,
)
from memjax import config_loading  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", type=pathlib.Path, help="write the figures here")
  parser.add_argument("--smoke", action="store_true", help="a tiny model for a few steps")
  parser.add_argument("--steps", type=int, help="optimizer steps per run (default 400; smoke 8)")
  parser.add_argument("--n-keys", type=int, nargs="*", default=[64, 256],
                      help="sub-keys per half: tables of n^2 slots")
  parser.add_argument("--updates", nargs="*", default=["dense", "sparse"], choices=["dense", "sparse"])
  parser.add_argument("--value-lrs", type=float, nargs="*", default=[0.003, 0.01, 0.03],
                      help="the table learning rates swept for the sparse update (dense runs at "
                      "the config's)")
  parser.add_argument("--seeds", type=int, nargs="*", default=[0])
  args = parser.parse_args()
  run = dict(SMOKE_RUN if args.smoke else DEFAULT_RUN)
  run["steps"] = args.steps or (8 if args.smoke else run["steps"])
  smoke_model = SMOKE_BASE + ["model.memory.knn=4"] if args.smoke else []
  base = MEMORY + smoke_model + run_budget(run, run["steps"], args.smoke)
  n_keys = [16] if args.smoke else args.n_keys
  default_lr = config_loading.load("tiny", base).optim.value_lr
  value_lrs = [default_lr] if args.smoke else args.value_lrs

  rows = []
  for n in n_keys:
    runs = [("dense", default_lr)] * ("dense" in args.updates)
    runs += [("sparse", lr) for lr in sorted(value_lrs)] * ("sparse" in args.updates)
    for update, lr in runs:
      for seed in args.seeds:
        cfg = config_loading.load("tiny", base + [
            f"model.memory.n_keys={n}", f"optim.value_lr={lr}",
            f"optim.table_update={update}", f"seed={seed}"])
        result = run_model(cfg, log=None)
        rows.append({"slots": n * n, "update": update, "value_lr": lr, "seed": seed, **result})
        print(f"{n}^2 slots, {update}, table lr {lr:g}, seed {seed}: eval loss "
              f"{result['eval_loss']:.4f}, recall {result['recall']:.1%} ({result['seconds']:.0f} s)",
              file=sys.stderr, flush=True)

  print(f"dense against sparse table updates: Memory+ (configs/tiny.yaml, memory in blocks 1 and "
        f"3), {run['steps']} steps of {run['batch_size']} x {run['seq_len']} bytes, "
        f"{run['people']} people; seeds {args.seeds}; jax {jax.__version__}")
  print("| slots | table update | table lr | eval loss | fact recall | train time (s) |")
  print("|---|---|---|---|---|---|")
  groups = {}
  for r in rows:
    groups.setdefault((r["slots"], r["update"], r["value_lr"]), []).append(r)
  spread = lambda xs, fmt: fmt(np.mean(xs)) + (f" ± {fmt(np.std(xs))}" if len(xs) > 1 else "")
  for (slots, update, lr), group in groups.items():
    print(f"| {slots:,} | {update} | {lr:g} | "
          f"{spread([g['eval_loss'] for g in group], lambda x: f'{x:.4f}')} | "
          f"{spread([g['recall'] for g in group], lambda x: f'{x:.1%}')} | "
          f"{np.mean([g['seconds'] for g in group]):.0f} |")
  print(f"Chance level of fact recall: {rows[0]['chance']:.1%}.")
  if args.json:
    args.json.write_text(json.dumps({"run": run, "rows": rows}, indent=2))


if __name__ == "__main__":
  main()
