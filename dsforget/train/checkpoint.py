"""Resumable checkpoints on top of DeepSpeed's own save/load_checkpoint.

A checkpoint is ``<root>/step<N>/``: DeepSpeed's model and optimizer partitions (which carry
ForgetAdamW's moments and its plan digest), ``plan.json``, ``trainer.json`` (step, data
position, world size, and the settings a resume must share with the run that saved, see
``check_resume``) and one ``rng_rank<R>.pt`` per rank. It counts only once ``COMPLETE`` exists:
rank 0 writes that marker (atomically, by rename) after every rank has finished writing, so a
crash mid-save leaves the previous complete checkpoint the newest one resume will pick. Saving
over an existing tag takes its marker away first, and deleting an old checkpoint starts with
its marker, so a half-overwritten or half-deleted directory never counts as complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import write_atomic
from ..optim.plan import MaskPlan

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step(\d+)$")


@dataclass(frozen=True)
class TrainerState:
    """Where training stands: enough to continue on exactly the next micro-batch."""

    step: int  # optimizer steps done (skipped ones included)
    epoch: int  # epoch of the next micro-batch
    micro_batch: int  # index of the next micro-batch within that epoch (per rank)
    nonfinite_steps: int = 0  # steps skipped for inf/NaN gradients so far
    nonfinite_in_a_row: int = 0  # of which the latest ones in a row


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


def _remove(directory: Path) -> None:
    """Delete a checkpoint, its marker first: a crash part way leaves it incomplete, not broken."""
    (directory / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)


def save(
    engine: Any,
    root: str | Path,
    state: TrainerState,
    plan: MaskPlan,
    keep: int,
    run: Mapping[str, Any] | None = None,
) -> Path:
    """Save on every rank (collective); returns the checkpoint directory.

    `run`: the settings a resume must match (``dsforget.train.job.run_identity``), kept in trainer.json.
    """
    from deepspeed import comm

    root = Path(root)
    tag = tag_of(state.step)
    directory = root / tag
    rank = comm.get_rank()
    if rank == 0:  # a run resumed from an older checkpoint saves this step again
        (directory / COMPLETE).unlink(missing_ok=True)
    comm.barrier()  # no rank writes into a directory that still looks complete
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(
        {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        directory / f"rng_rank{rank}.pt",
    )
    if rank == 0:
        plan.save(directory / "plan.json")
        saved = {**asdict(state), "world_size": comm.get_world_size(), "run": dict(run or {})}
        write_atomic(directory / "trainer.json", json.dumps(saved))
    comm.barrier()
    if rank == 0:
        write_atomic(directory / COMPLETE, "")
        for old in complete_checkpoints(root)[:-keep]:
            _remove(old)
    comm.barrier()
    return directory


def read_plan(directory: str | Path) -> MaskPlan:
    return MaskPlan.load(Path(directory) / "plan.json")


def _shape_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    names = sorted(set(saved) | set(current))
    differing = [name for name in names if saved.get(name) != current.get(name)]
    examples = ", ".join(
        f"{name}: {tuple(saved[name]) if name in saved else 'absent'} there, "
        f"{tuple(current[name]) if name in current else 'absent'} here"
        for name in differing[:3]
    )
    return f"{len(differing)} of {len(names)} parameters differ ({examples})"


def check_resume(directory: str | Path, run: Mapping[str, Any], world_size: int) -> None:
    """Refuse to resume from `directory` unless it is complete and was written by the same kind of
    run: the same model (parameter names and shapes), plan settings, data and batch layout
    (`run`, from ``dsforget.train.job.run_identity``) and number of ranks. Call before building the plan.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"resume: checkpoint {directory} does not exist")
    if not (directory / COMPLETE).exists():
        raise FileNotFoundError(
            f"resume: checkpoint {directory} is incomplete (no {COMPLETE} marker: a save was cut short); "
            f"resume from an older one, or use --resume auto to pick the newest complete one"
        )
    saved = json.loads((directory / "trainer.json").read_text())
    fix = (
        "continuing would mix two different runs: rerun with the checkpoint's settings, or start "
        "afresh with another --output_dir or --resume never"
    )
    saved_run = saved.get("run") or {}  # checkpoints from before this check carry none
    saved_shapes, shapes = saved_run.get("parameters"), run.get("parameters")
    if saved_shapes is not None and shapes is not None and saved_shapes != shapes:
        raise ValueError(
            f"resume: checkpoint {directory} was written for another model: "
            f"{_shape_differences(saved_shapes, shapes)}; {fix}"
        )
    differing = [
        key for key in sorted(set(saved_run) & set(run)) if key != "parameters" and saved_run[key] != run[key]
    ]
    if differing:
        details = ", ".join(f"{key}={saved_run[key]!r} there, {run[key]!r} here" for key in differing)
        raise ValueError(f"resume: checkpoint {directory} was written by a run with {details}; {fix}")
    if saved["world_size"] != world_size:
        raise ValueError(
            f"resume: checkpoint {directory} was written by {saved['world_size']} ranks, this run has "
            f"{world_size}: resume with the original number of ranks (the data position is per rank)"
        )


def load(engine: Any, directory: str | Path) -> TrainerState:
    """Restore engine, optimizer and this rank's RNG from a complete checkpoint (collective)."""
    from deepspeed import comm

    directory = Path(directory)
    if not (directory / COMPLETE).exists():
        raise FileNotFoundError(f"checkpoint {directory} is incomplete (no {COMPLETE} marker); pick another")
    saved = json.loads((directory / "trainer.json").read_text())
    saved.pop("run", None)
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
