"""The benchmarks at a tiny size, so they cannot rot.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import csv
import re
import time

import pytest
import torch
from dsforget.kernels import default_backend
from dsforget.kernels._triton import triton
from helpers import run_python


def test_benchmark_tiny_run(tmp_path):
    """Keeps `python -m dsforget.kernels.bench` from rotting: every implementation runs (or is
    reported unavailable with a reason), the fused step matches the reference, the CSV is written.
    On a machine where DeepSpeed's cpu_adam op was never built, building it adds ~95 s (2 cores)."""
    output = tmp_path / "bench.csv"
    result = run_python(["-m", "dsforget.kernels.bench", "--tiny", "--csv", str(output)])
    assert "| dsforget-cpu |" in result.stdout, result.stdout
    with open(output, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    names = [row["implementation"] for row in rows]
    assert names[:3] == ["mofo-reference", "dsforget-torch", "dsforget-cpu"]
    for row in rows:
        assert row["status"] == "ok" or row["status"].startswith("unavailable: "), row
        assert row["device"] and row["torch"] and row["deepspeed"]
    fused = next(row for row in rows if row["implementation"] == "dsforget-cpu")
    assert fused["status"] == "ok" and float(fused["max_abs_error"]) < 1e-6, fused


def test_model_benchmark_tiny_run():
    """Keeps `python -m dsforget.kernels.bench_model` from rotting: MoFO and torch's fused AdamW
    step a whole (tiny) Llama's parameters and get a time; baselines that cannot run say why."""
    result = run_python(["-m", "dsforget.kernels.bench_model", "--tiny"])
    rows = {
        cells[0]: cells[1:]
        for line in result.stdout.splitlines()
        if line.startswith("| ") and not line.startswith(("| implementation", "| ---"))
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    backend = default_backend(torch.device("cpu"))
    for name in (f"mofo-{backend}", "torch-adamw-fused"):
        assert float(rows[name][0]) > 0, result.stdout
    assert len(rows) == 4 and all(
        cells[0].replace(".", "", 1).isdigit() or cells[0].startswith("unavailable: ")
        for cells in rows.values()
    ), result.stdout


# ------------------------------------------------------------------- the one-pass (speculative) step


def test_benchmark_does_not_hang_on_a_stale_deepspeed_build_lock(tmp_path, monkeypatch):
    """Catches the benchmark waiting forever: DeepSpeed JIT-builds cpu_adam under torch's lock,
    and a run killed mid-build leaves that lock behind (seen: every later benchmark hung until the
    test's timeout). With a 1 s bound the DeepSpeed row must stop within seconds naming the lock."""
    from types import SimpleNamespace

    from dsforget.kernels import _cpu
    from dsforget.kernels.bench import flat

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("DSFORGET_BUILD_LOCK_TIMEOUT_S", "1")
    lock = _cpu.build_directory("cpu_adam") / "lock"
    lock.touch()
    state = SimpleNamespace(
        param=torch.zeros(8), grad=torch.ones(8), step=1, exp_avg=torch.zeros(8), exp_avg_sq=torch.zeros(8)
    )
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=re.escape(str(lock))):
        flat.deepspeed_adam_step(None, state)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("paired", [False, True], ids=["own-processes", "paired"])
def test_separate_matrices_benchmark_tiny_run(paired: bool):
    """Keeps `python -m dsforget.kernels.bench_model --matrices` from rotting: each implementation
    runs in its own process (or, with --paired, all in one, their steps alternating) and reports
    a time, a ratio to torch's fused AdamW and its peak extra memory (not measured when paired)."""
    flags = ["--paired"] if paired else []
    result = run_python(["-m", "dsforget.kernels.bench_model", "--matrices", "3x64", "--tiny", *flags])
    how = "all implementations in one process" if paired else "each implementation in its own process"
    assert how in result.stdout, result.stdout
    rows = {
        cells[0]: cells[1:]
        for line in result.stdout.splitlines()
        if line.startswith("| ") and not line.startswith(("| implementation", "| ---"))
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    backend = default_backend(torch.device("cpu"))
    assert set(rows) == {f"mofo-{backend}", f"mofo-{backend}-per-tensor", "torch-adamw-fused"}, result.stdout
    for cells in rows.values():
        assert float(cells[0]) > 0 and float(cells[2]) > 0, result.stdout
        assert cells[3] == "n/a" or not paired, result.stdout  # one process: no peak per implementation
    assert float(rows["torch-adamw-fused"][2]) == 1.0


# ------------------------------------------------------------------- the Triton launch sweep


def test_triton_sweep_without_cuda_says_so_and_fails(capsys):
    """Catches `--triton-sweep` crashing, or passing silently, where there is no GPU to time: it
    must name the reason and exit non-zero."""
    from dsforget.kernels.bench import flat

    assert flat.main(["--triton-sweep", "--device", "cpu"]) == 2
    out = capsys.readouterr().out
    assert "--triton-sweep" in out and ("CUDA" in out or "Triton" in out), out


@pytest.mark.skipif(triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("case", ["triton-interpret"])  # (run by test_triton.py, deselected elsewhere)
def test_triton_sweep_times_every_kernel(case):
    """Keeps the sweep's own code from rotting until a GPU runs it: on the interpreter, every
    kernel is timed at each (TILE, num_warps) of a small grid and tabulated with the table's
    choice marked."""
    from dsforget.kernels.bench import sweep

    grid = [(256, 2), (1024, 4)]
    cells = sweep.sweep([5003], torch.device("cpu"), repeats=1, grid=grid)
    assert {(c.kernel, c.tile_size, c.num_warps) for c in cells} == {
        (kernel, *launch) for kernel in sweep.KERNELS for launch in grid
    }
    assert all(c.microseconds > 0 and c.gb_per_s > 0 for c in cells)
    text = sweep.format_sweep(cells, "interpreter")
    assert text.count("best: TILE") == len(sweep.KERNELS) and "*" in text, text
    assert all(2 <= tile // (32 * warps) <= 32 for tile, warps in sweep.sweep_grid())
