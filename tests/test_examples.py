"""The README's drop-in example, started by DeepSpeed's own launcher on 2 CPU ranks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_dropin_example_runs_under_the_deepspeed_launcher() -> None:
    """Catches an example (and README command) that no longer runs, and a loss that does not fall."""
    launcher = Path(sys.executable).with_name("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [str(launcher), "--num_gpus", "2", "launch/examples/dropin_zero3.py", "--steps", "10"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step +\d+  loss ([0-9.]+)$", done.stdout, flags=re.M)]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.3, done.stdout[-2000:]
