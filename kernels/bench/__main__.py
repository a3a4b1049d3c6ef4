"""`python -m dsforget.kernels.bench [--sizes 1M,4M] [--csv FILE] [--tiny] [--triton-sweep]`: see
flat.py (and sweep.py for --triton-sweep)."""

import sys

from .flat import main

sys.exit(main())
