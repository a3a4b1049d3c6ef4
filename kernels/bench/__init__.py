"""Benchmarks of the fused step (CI runs each at a tiny size, tests/kernels/test_bench.py).

    python -m dsforget.kernels.bench          # one flat shard: flat.py (its docstring has the columns)
    python -m dsforget.kernels.bench_model    # optimizer.step over a whole Llama's parameters: model.py

Results and the machines they came from: kernels/RESULTS.md.
"""

from .flat import main

__all__ = ["main"]  # `dsforget.kernels.bench.main`, as when the benchmark was one module
