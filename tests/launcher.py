"""Start N real gloo ranks as subprocesses, with a free port and a timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
    procs = []
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
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv],
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + timeout
    outputs = []
    for rank, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise TimeoutError(f"rank {rank} of {argv} did not finish within {timeout} s") from None
        outputs.append(out)
    failed = [rank for rank, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        raise RankFailure(failed, outputs)
    return outputs


class RankFailure(RuntimeError):
    def __init__(self, ranks: list[int], outputs: list[str]) -> None:
        self.ranks, self.outputs = ranks, outputs
        tails = "\n".join(f"--- rank {r} ---\n{outputs[r][-3000:]}" for r in ranks)
        super().__init__(f"ranks {ranks} failed:\n{tails}")
