"""The examples under launch/examples/: the drop-in and Trainer ones started by DeepSpeed's own launcher
on 2 CPU ranks, the SFTTrainer one in one process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from launcher import free_port

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_dropin_example_runs_under_the_deepspeed_launcher() -> None:
    """Catches an example (and README command) that no longer runs, and a loss that does not fall."""
    launcher = Path(sys.executable).with_name("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    # a free port, not DeepSpeed's default 29500, which another job on this host may hold
    command = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port())]
    command += ["launch/examples/dropin_zero3.py", "--steps", "10"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step +\d+  loss ([0-9.]+)$", done.stdout, flags=re.M)]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.3, done.stdout[-2000:]


def run_example(command: list[str], output: Path) -> list[float]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "--output_dir", str(output)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = re.findall(r"^losses every 10 steps: (.*)$", done.stdout, flags=re.M)
    assert found, done.stdout[-2000:]
    # the MoFO optimizer itself took every step (transformers swaps in its AdamW for an optimizer
    # passed as Trainer(optimizers=...) under DeepSpeed, and the loss falls all the same)
    assert re.search(r"^MoFOAdamW steps: 30$", done.stdout, flags=re.M), done.stdout[-2000:]
    return [float(x) for x in found[0].split(", ")]


@pytest.mark.distributed
def test_hf_trainer_example_with_and_without_deepspeed(tmp_path: Path) -> None:
    """The Trainer builds the DeepSpeed engine itself: the MoFO optimizer must be the one that steps
    (not the AdamW transformers builds in its place), must find ZeRO-3's partitions on its own
    (else its first step raises), and training must make progress in both set-ups."""
    example = "launch/examples/hf_trainer.py"
    plain = run_example([sys.executable, example], tmp_path / "plain")
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    zero3 = run_example(
        [launcher, "--num_gpus", "2", "--master_port", str(free_port()), example, "--zero", "3"],
        tmp_path / "zero3",
    )
    for losses in (plain, zero3):
        assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, losses


def test_sft_trainer_example(tmp_path: Path) -> None:
    """TRL's SFTTrainer on the example's chats, one process: MoFOAdamW must take every step and the
    loss must fall. (Under ZeRO-3 on 2 ranks the same pieces run in tests/integration/test_trl.py.)"""
    losses = run_example([sys.executable, "launch/examples/sft_trainer.py"], tmp_path / "sft")
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5, losses
