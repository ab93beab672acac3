"""`python -m memjax.eval <run dir> --tasks ...`: see `memjax.evaluation_harness`."""

from memjax.evaluation_harness import main

if __name__ == "__main__":
  main()
