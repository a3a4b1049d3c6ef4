"""Start N real gloo ranks as subprocesses, with a free port and a timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(
    argv: list[str], world_size: int, timeout: float = 300, env: dict[str, str] | None = None
) -> list[str]:
    """Run `python argv...` as ranks 0..world_size-1; return each rank's output, raise on failure."""
    port = str(free_port())
    procs, logs = [], []
    for rank in range(world_size):
        rank_env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
            **(env or {}),
        }
        # A file, not a pipe: a rank blocked on a full pipe would stall every collective.
        log = tempfile.TemporaryFile(mode="w+")
        logs.append(log)
        procs.append(
            subprocess.Popen([sys.executable, *argv], env=rank_env, stdout=log, stderr=subprocess.STDOUT)
        )
    deadline = time.monotonic() + timeout
    timed_out = None
    for rank, proc in enumerate(procs):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = rank
            for other in procs:
                other.kill()
                other.wait()
            break
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if timed_out is not None:
        tails = "\n".join(f"--- rank {r} ---\n{out[-3000:]}" for r, out in enumerate(outputs))
        raise TimeoutError(f"rank {timed_out} of {argv} did not finish within {timeout} s:\n{tails}")
    failed = [rank for rank, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        raise RankFailure(failed, outputs)
    return outputs


class RankFailure(RuntimeError):
    def __init__(self, ranks: list[int], outputs: list[str]) -> None:
        self.ranks, self.outputs = ranks, outputs
        tails = "\n".join(f"--- rank {r} ---\n{outputs[r][-3000:]}" for r in ranks)
        super().__init__(f"ranks {ranks} failed:\n{tails}")
