"""Resumable checkpoints on top of DeepSpeed's own save/load_checkpoint.

A checkpoint is ``<root>/step<N>/``: DeepSpeed's model and optimizer partitions (which carry
ForgetAdamW's moments and its plan digest), ``plan.json``, ``trainer.json`` (step, data
position, world size, save sequence, and the settings a resume must share with the run that
saved, see ``check_resume``) and one ``rng_rank<R>.pt`` per rank.

Invariants:

- It counts only once ``COMPLETE`` exists. Every rank fsyncs every file of the checkpoint, then
  rank 0 fsyncs the directory and its parent and writes the marker (atomically, fsynced), and
  only then deletes older checkpoints: a crash or power loss at any point leaves the previous
  complete checkpoint, or this one whole.
- A complete checkpoint is never written into again. Saving a step whose directory is already
  complete (a rewind, or a run resumed at its last step) writes ``step<N>-<sequence>/`` instead,
  so the old one stays until the new one is complete.
- Checkpoints are ordered by ``sequence`` (1 + the highest one in `root` when saved), not by
  step: the newest save of the current lineage is the one ``--resume auto`` continues. A save
  knows its `parent` (the checkpoint its run continued from, or its previous save); complete
  checkpoints saved after the parent by another lineage (the future a rewind abandoned) are
  deleted with the old ones beyond ``keep``, never the new one.
- The RNG files hold only tensors and plain values and are read with ``weights_only=True``: a
  file that would run code when unpickled is refused. DeepSpeed's own files are unpickled by
  DeepSpeed: resuming from a checkpoint trusts its author as much as running their code.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import fsync_directory, fsync_tree, write_atomic
from ..errors import InputFileError, UserInputError
from ..optim.plan import MaskPlan
from ..strict_json import dumps

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step(\d+)(?:-(\d+))?$")
logger = logging.getLogger("dsforget")


class ResumeError(UserInputError, ValueError):
    """The checkpoint to resume from was written by another kind of run (model, settings, ranks)."""


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


def read_trainer_json(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / "trainer.json").read_text())


def sequence_of(directory: str | Path) -> int:
    """The save sequence of a complete checkpoint; 0 for those saved before sequences existed."""
    return int(read_trainer_json(directory).get("sequence", 0))


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (by save sequence, then step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _TAG.match(path.name)
        if match and (path / COMPLETE).exists():
            found.append((sequence_of(path), int(match.group(1)), path))
    return [path for *_, path in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _remove(directory: Path) -> None:
    """Delete a checkpoint, its marker first: a crash part way leaves it incomplete, not broken."""
    (directory / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)


def _new_directory(root: Path, step: int) -> tuple[str, int]:
    """(tag, sequence) of the next save of `step` (rank 0): ``step<N>`` unless a complete
    checkpoint holds that name; a leftover incomplete directory of the same name is removed."""
    sequence = 1 + max((sequence_of(path) for path in complete_checkpoints(root)), default=0)
    tag = tag_of(step)
    if (root / tag / COMPLETE).exists():
        tag = f"{tag}-{sequence}"
    if (root / tag).exists():  # a save of this name cut short: nothing in it counts
        _remove(root / tag)
    return tag, sequence


def _prune(root: Path, new: Path, parent: Path | None, keep: int) -> None:
    """Delete what the lineage of `new` no longer needs (rank 0, after `new` is complete):
    complete checkpoints saved after `parent` other than `new` (the future a rewind abandoned),
    the oldest ones beyond `keep`, and incomplete leftovers of cut-short saves. With no parent
    in `root` (a run from the base model, or resumed from elsewhere) nothing counts as abandoned."""
    in_root = parent is not None and parent.resolve().parent == root.resolve()
    after = sequence_of(parent) if in_root and (parent / COMPLETE).exists() else None
    lineage = []
    for path in complete_checkpoints(root):
        if path != new and after is not None and sequence_of(path) > after:
            logger.info("checkpoint %s belongs to a run this one rewound past: deleted", path)
            _remove(path)
        else:
            lineage.append(path)
    for old in lineage[:-keep]:
        _remove(old)
    for path in root.iterdir():
        if _TAG.match(path.name) and path != new and not (path / COMPLETE).exists():
            _remove(path)


def _from_rank0(values: list[Any]) -> list[Any]:
    from deepspeed import comm

    if comm.get_world_size() > 1:
        comm.broadcast_object_list(values, src=0)
    return values


def save(
    engine: Any,
    root: str | Path,
    state: TrainerState,
    plan: MaskPlan,
    keep: int,
    run: Mapping[str, Any] | None = None,
    *,
    parent: str | Path | None,
) -> Path:
    """Save on every rank (collective); returns the checkpoint directory.

    `parent`: the checkpoint this save continues (the one the run resumed from, or its previous
    save; None for a run from the base model). `run`: the settings a resume must match
    (``dsforget.train.job.run_identity``), kept in trainer.json.
    """
    from deepspeed import comm

    root = Path(root)
    parent = Path(parent) if parent is not None else None
    rank = comm.get_rank()
    decided: list[Any] = [None, None]
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        decided = list(_new_directory(root, state.step))
    tag, sequence = _from_rank0(decided)  # also: no rank writes before rank 0 cleared the name
    directory = root / tag
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(rng_state(), directory / f"rng_rank{rank}.pt")
    if rank == 0:
        plan.save(directory / "plan.json")
        saved = {
            **asdict(state),
            "world_size": comm.get_world_size(),
            "sequence": sequence,
            "parent": parent.name if parent is not None else None,
            "run": dict(run or {}),
        }
        write_atomic(directory / "trainer.json", dumps(saved))
    comm.barrier()  # every rank's files are written
    fsync_tree(directory)  # each rank flushes what it wrote (DeepSpeed's files, its RNG file)
    comm.barrier()
    if rank == 0:
        fsync_directory(root)
        fsync_directory(root.parent)
        write_atomic(directory / COMPLETE, "")  # fsynced with its directory entry
        _prune(root, directory, parent, keep)
    comm.barrier()
    return directory


def read_plan(directory: str | Path) -> MaskPlan:
    return MaskPlan.load(Path(directory) / "plan.json")


def saved_step(directory: str | Path) -> int:
    return int(read_trainer_json(directory)["step"])


# -- RNG state --------------------------------------------------------------------------------


def _accelerator() -> Any:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def _accelerator_rng_state() -> torch.Tensor | None:
    """This rank's accelerator RNG (its current device), or None where the accelerator has none."""
    get_state = getattr(_accelerator(), "get_rng_state", None)
    if get_state is None:
        return None
    try:
        state = get_state()
    except (NotImplementedError, RuntimeError):
        return None
    return state.cpu() if torch.is_tensor(state) else None


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "accelerator": _accelerator_rng_state(),
        "accelerator_name": _accelerator().device_name(),
    }


def read_rng_state(path: str | Path) -> dict[str, Any]:
    """An RNG file read without running code: only tensors and plain values are accepted (and
    the numpy arrays of files written before the RNG was stored as plain values)."""
    numpy_core = getattr(np, "_core", None) or np.core
    legacy = [np.ndarray, np.dtype, np.dtypes.UInt32DType, numpy_core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(legacy):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"resume: {path} is not a dsforget RNG file: it holds pickled objects other than tensors "
            f"and plain values, which could run code when loaded, so dsforget refuses it. Resume "
            f"only from checkpoints you or a trusted run wrote ({str(error).splitlines()[0][:200]})"
        ) from None


def restore_rng_state(state: Mapping[str, Any]) -> None:
    python = state["python"]
    if isinstance(python, dict):
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    else:  # files written before RNG states were plain values
        random.setstate(python)
    numpy = state["numpy"]
    if isinstance(numpy, dict):
        keys = np.asarray(numpy["keys"].numpy(), dtype=np.uint32)
        np.random.set_state(
            (numpy["name"], keys, numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"])
        )
    else:
        np.random.set_state(numpy)
    torch.set_rng_state(state["torch"])
    accelerator_state = state.get("accelerator")
    if accelerator_state is None:
        return
    accelerator = _accelerator()
    if state.get("accelerator_name") != accelerator.device_name():
        logger.warning(
            "resume: the checkpoint's accelerator RNG is from %s, this run uses %s: not restored, "
            "so dropout draws differ from an uninterrupted run",
            state.get("accelerator_name"),
            accelerator.device_name(),
        )
        return
    accelerator.set_rng_state(accelerator_state)


# -- resume -----------------------------------------------------------------------------------


def _shape_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    names = sorted(set(saved) | set(current))
    differing = [name for name in names if saved.get(name) != current.get(name)]
    examples = ", ".join(
        f"{name}: {tuple(saved[name]) if name in saved else 'absent'} there, "
        f"{tuple(current[name]) if name in current else 'absent'} here"
        for name in differing[:3]
    )
    return f"{len(differing)} of {len(names)} parameters differ ({examples})"


def check_resume(
    directory: str | Path, run: Mapping[str, Any], world_size: int, defaults: Mapping[str, Any] | None = None
) -> None:
    """Refuse to resume from `directory` unless it is complete and was written by the same kind of
    run: the same model (parameter names and shapes), plan settings, data and batch layout
    (`run`, from ``dsforget.train.job.run_identity``) and number of ranks. Call before building the plan.

    defaults: the value a setting had before it existed (``job.identity_defaults``), for keys a
    checkpoint written earlier does not carry: such a checkpoint resumes only where this run leaves
    them at that value. Keys with no default (derived ones: the attention kernel) are not compared.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputFileError(f"resume: checkpoint {directory} does not exist (--resume)")
    if not (directory / COMPLETE).exists():
        raise InputFileError(
            f"resume: checkpoint {directory} is incomplete (no {COMPLETE} marker: a save was cut short); "
            f"resume from an older one, or use --resume auto to pick the newest complete one"
        )
    saved = read_trainer_json(directory)
    fix = (
        "continuing would mix two different runs: rerun with the checkpoint's settings, or start "
        "afresh with another --output_dir or --resume never"
    )
    saved_run = saved.get("run") or {}  # checkpoints from before this check carry none
    if saved_run and defaults:
        saved_run = {**{key: value for key, value in defaults.items() if key in run}, **saved_run}
    saved_shapes, shapes = saved_run.get("parameters"), run.get("parameters")
    if saved_shapes is not None and shapes is not None and saved_shapes != shapes:
        raise ResumeError(
            f"resume: checkpoint {directory} was written for another model: "
            f"{_shape_differences(saved_shapes, shapes)}; {fix}"
        )
    differing = [
        key for key in sorted(set(saved_run) & set(run)) if key != "parameters" and saved_run[key] != run[key]
    ]
    if differing:
        details = ", ".join(f"{key}={saved_run[key]!r} there, {run[key]!r} here" for key in differing)
        raise ResumeError(f"resume: checkpoint {directory} was written by a run with {details}; {fix}")
    if saved["world_size"] != world_size:
        raise ResumeError(
            f"resume: checkpoint {directory} was written by {saved['world_size']} ranks, this run has "
            f"{world_size}: resume with the original number of ranks (the data position is per rank)"
        )


def load(engine: Any, directory: str | Path) -> TrainerState:
    """Restore engine, optimizer and this rank's RNG (CPU and accelerator) from a complete
    checkpoint (collective). The RNG file is read first, without running code."""
    from deepspeed import comm

    directory = Path(directory)
    if not (directory / COMPLETE).exists():
        raise FileNotFoundError(f"checkpoint {directory} is incomplete (no {COMPLETE} marker); pick another")
    saved = read_trainer_json(directory)
    world_size = saved["world_size"]
    if world_size != comm.get_world_size():
        raise RuntimeError(
            f"checkpoint {directory} was written by {world_size} ranks, "
            f"this run has {comm.get_world_size()}: "
            "resume with the original number of ranks (the data position is per rank)"
        )
    rng = read_rng_state(directory / f"rng_rank{comm.get_rank()}.pt")
    load_path, _ = engine.load_checkpoint(str(directory.parent), tag=directory.name)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {directory}")
    restore_rng_state(rng)
    fields = TrainerState.__dataclass_fields__
    return TrainerState(**{key: value for key, value in saved.items() if key in fields})
