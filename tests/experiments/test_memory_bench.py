"""launch/memory_bench.py end to end on two tiny sizes (the README's command, shortened): it runs
the job twice on 2 CPU ranks and tabulates every rank's peak memory per parameter by phase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launcher import REPO

pytestmark = pytest.mark.distributed


def test_memory_bench_reads_every_ranks_peaks_from_the_runs(tmp_path: Path, lab_cache: Path) -> None:
    """Catches a report.json without per-rank memory, phases missing from it, and a benchmark
    that leaves DeepSpeed's buckets at their defaults (they would read as memory per parameter)."""
    out = tmp_path / "bench"
    argv = [sys.executable, str(REPO / "launch" / "memory_bench.py"), "--sizes", "64x2,128x2", "--steps", "1"]
    argv += ["--eval_examples", "2", "--output_dir", str(out)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "DSFORGET_CACHE": str(lab_cache)}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "host B/param" in result.stdout and "target on CPU ranks" in result.stdout, result.stdout
    bench = json.loads((out / "memory_bench.json").read_text())
    small, large = bench["runs"]
    assert small["parameters"] < large["parameters"]
    for run in bench["runs"]:
        assert len(run["host_peak_bytes"]) == 2 and min(run["host_peak_bytes"]) > 100 * 2**20, run
        phases = run["host_peak_bytes_by_end_of"]
        assert list(phases) == ["load", "initialize", "score_base", "train", "export", "score_tuned", "drift"]
        for rank in range(2):  # high-water marks: never lower in a later phase, nor above the final peak
            marks = [phases[phase][rank] for phase in phases]
            assert marks == sorted(marks) and marks[-1] <= run["host_peak_bytes"][rank], (rank, marks)
    assert len(bench["bytes_per_parameter"]["host_peak_bytes"]) == 2
    zero = json.loads((out / "deepspeed.json").read_text())["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_max_live_parameters"] == 1_000_000
