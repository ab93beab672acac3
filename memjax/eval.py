"""`python -m memjax.eval <run dir> --tasks ...`: see `memjax.evaluation_harness`."""

import sys

from memjax import platforms
from memjax.evaluation_harness import main

if __name__ == "__main__":
  platforms.quiet_libtpu()  # before JAX starts a backend
  sys.exit(main())
