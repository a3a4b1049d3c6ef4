"""A finished user script exits 0: ZeRO-3 on 2 CPU ranks through dsforget.initialize, run repeatedly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from launcher import REPO, free_port

RUNS = 8


@pytest.mark.distributed
def test_user_script_after_zero3_exits_0_every_time(tmp_path: Path) -> None:
    """A script that trains under ZeRO-3 and returns without destroy_process_group once ended
    with status 250 (a rank's SIGABRT at interpreter exit) in 1 of 3 runs; dsforget.initialize
    now destroys the group from an atexit hook. Catches an exit that aborts in any of 8 runs."""
    launcher = Path(sys.executable).with_name("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    failures = []
    for run in range(RUNS):
        result = tmp_path / f"result{run}"
        command = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port())]
        command += [str(REPO / "tests" / "workers" / "user_zero3_exit.py"), str(result)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0 or not result.exists():
            failures.append(f"run {run}: status {done.returncode}\n{(done.stdout + done.stderr)[-2000:]}")
    assert not failures, "\n".join(failures)
