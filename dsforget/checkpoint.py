"""Resumable checkpoints on top of DeepSpeed's own save/load_checkpoint.

A checkpoint is ``<root>/step<N>/``: DeepSpeed's model and optimizer partitions (which carry
ForgetAdamW's moments and its plan digest), ``plan.json``, ``trainer.json`` (step, data
position) and one ``rng_rank<R>.pt`` per rank. It counts only once ``COMPLETE`` exists:
rank 0 writes that marker (atomically, by rename) after every rank has finished writing, so a
crash mid-save leaves the previous complete checkpoint the newest one resume will pick.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .plan import MaskPlan

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step(\d+)$")


@dataclass(frozen=True)
class TrainerState:
    """Where training stands: enough to continue on exactly the next micro-batch."""

    step: int  # optimizer steps done
    epoch: int  # epoch of the next micro-batch
    micro_batch: int  # index of the next micro-batch within that epoch (per rank)


def tag_of(step: int) -> str:
    return f"step{step}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _TAG.match(path.name)
        if match and (path / COMPLETE).exists():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def save(engine: Any, root: str | Path, state: TrainerState, plan: MaskPlan, keep: int) -> Path:
    """Save on every rank (collective); returns the checkpoint directory."""
    from deepspeed import comm

    root = Path(root)
    tag = tag_of(state.step)
    directory = root / tag
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    rank = comm.get_rank()
    torch.save(
        {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        directory / f"rng_rank{rank}.pt",
    )
    if rank == 0:
        plan.save(directory / "plan.json")
        _write_atomically(
            directory / "trainer.json", json.dumps({**asdict(state), "world_size": comm.get_world_size()})
        )
    comm.barrier()
    if rank == 0:
        _write_atomically(directory / COMPLETE, "")
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return directory


def read_plan(directory: str | Path) -> MaskPlan:
    return MaskPlan.load(Path(directory) / "plan.json")


def load(engine: Any, directory: str | Path) -> TrainerState:
    """Restore engine, optimizer and this rank's RNG from a complete checkpoint (collective)."""
    from deepspeed import comm

    directory = Path(directory)
    if not (directory / COMPLETE).exists():
        raise FileNotFoundError(f"checkpoint {directory} is incomplete (no {COMPLETE} marker); pick another")
    saved = json.loads((directory / "trainer.json").read_text())
    world_size = saved.pop("world_size")
    if world_size != comm.get_world_size():
        raise RuntimeError(
            f"checkpoint {directory} was written by {world_size} ranks, "
            f"this run has {comm.get_world_size()}: "
            "resume with the original number of ranks (the data position is per rank)"
        )
    load_path, _ = engine.load_checkpoint(str(directory.parent), tag=directory.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {directory}")
    rng = torch.load(directory / f"rng_rank{comm.get_rank()}.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return TrainerState(**saved)
