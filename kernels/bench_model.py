"""`python -m dsforget.kernels.bench_model`: kept as a command; the benchmark is
kernels/bench/model.py (see its docstring for the flags)."""

import sys

from .bench.model import main

if __name__ == "__main__":
    sys.exit(main())
