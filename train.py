"""Trains a memjax language model.

  python train.py                                        # configs/tiny.yaml on the knowledge corpus
  python train.py config=configs/X.yaml key=value ...    # e.g. train.steps=1000 optim.lr=1e-3
  python train.py config=path/to/lingua.yaml             # a reference (Lingua) config, as it is

Checkpoints, metrics.jsonl and TensorBoard files go to train.run_dir (default runs/<config name>);
a run directory that holds checkpoints resumes from the newest one.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from memjax import platforms  # noqa: E402
platforms.quiet_libtpu()  # before JAX starts a backend

from memjax import cli  # noqa: E402
from memjax import config as config_lib  # noqa: E402
from memjax import config_loading  # noqa: E402


def parse_args(argv: list[str]) -> tuple[str, config_lib.Config]:
  if "-h" in argv or "--help" in argv:
    print(__doc__)
    sys.exit(0)
  path, _, overrides = config_loading.split_command_line(argv)
  return path, config_loading.load(path, overrides)


@cli.entry_point
def main(argv: list[str]) -> int:
  from memjax.training import loop

  name, cfg = parse_args(argv)
  run_dir = cfg.train.run_dir or loop.default_run_dir(name)
  loop.run(cfg, run_dir)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
