"""What a run reads from disk: the model checkpoint, the training file and the evaluation
sources, resolved from the run config (the embedded lab's files, or the user's), checked with
errors that name the file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import DataConfig, DataError, PreparedData, load_conversations
from ..data_cache import default_data_cache_dir, prepare_cached
from ..errors import InputFileError, UserInputError
from ..eval.forgetting import EvalSources
from ..eval.general_tasks import GeneralTasks, load_general_tasks
from . import faults
from .run_config import RunConfig

# Processes that tokenise by default: one per core this process may use, at most this many (more
# rarely pays: each starts its own interpreter and a copy of the tokenizer).
MAX_DATA_WORKERS = 16

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model*.safetensors")


@dataclass(frozen=True)
class Inputs:
    """Everything the run reads from disk, resolved from the config (the lab or user files)."""

    model_dir: Path
    train_file: Path
    eval_sources: EvalSources
    general_tasks: GeneralTasks | None = None  # --general_tasks, loaded with their documents


def _read_jsonl(path: str | Path, what: str) -> list[dict]:
    """The records of a JSONL file the user named with the flag --`what`."""
    records = []
    try:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataError(
                            f"{path}:{number}: {what} line is not valid JSON ({err.msg})"
                        ) from None
    except FileNotFoundError:
        raise InputFileError(f"{what} file {path} does not exist (--{what})") from None
    return records


def check_model_dir(path: str | Path, flag: str = "--model") -> Path:
    """A local Hugging Face checkpoint directory with a config and weights, or a clear error
    naming the `flag` that gave it."""
    path = Path(path)
    if not path.is_dir():
        raise InputFileError(
            f"model directory {path} does not exist ({flag}; dsforget never downloads checkpoints)"
        )
    if not (path / "config.json").exists():
        raise InputFileError(
            f"model directory {path} has no config.json ({flag}): is it a Hugging Face checkpoint?"
        )
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise InputFileError(
            f"model directory {path} has no weights (*.safetensors or pytorch_model*.bin) ({flag})"
        )
    return path


def resolve_inputs(config: RunConfig) -> Inputs:
    """The run's files, each checked first, so that a missing one is reported with its flag; the
    --general_tasks are loaded here too, so that a bad one fails before the model is."""
    limit = config.eval_max_examples
    if config.data is not None and not Path(config.data).is_file():
        raise InputFileError(f"data file {config.data} does not exist (--data)")
    if config.uses_lab:
        from ..lab import LabConfig, build_lab
        from ..lab.lm_eval_tasks import lab_task_dir

        lab = build_lab(LabConfig.preset(config.lab_preset))
        task = _task_records(config.eval_data) if config.eval_data else lab.load_task_eval()
        general = read_general_texts(config.general_text) if config.general_text else lab.load_heldout_texts()
        skills = lab.load_skill_eval() if lab.skill_eval.exists() else []
        sources = EvalSources(task[:limit], lab.load_facts()[:limit], general[:limit], skills[:limit])
        model_dir = check_model_dir(config.init_from, "--init_from") if config.init_from else lab.model_dir
        tasks = _general_tasks(config, lambda: [lab_task_dir(lab)])
        return Inputs(model_dir, Path(config.data or lab.task_train), sources, tasks)
    sources = EvalSources(
        task_records=_task_records(config.eval_data)[:limit] if config.eval_data else [],
        general_texts=read_general_texts(config.general_text)[:limit] if config.general_text else [],
    )
    model_dir = check_model_dir(config.model)
    return Inputs(model_dir, Path(config.data), sources, _general_tasks(config, list))


def _general_tasks(config: RunConfig, include_paths: Callable[[], list[Path]]) -> GeneralTasks | None:
    """--general_tasks loaded, task folders from `include_paths` (called only when there are any:
    the lab writes its task files on first use)."""
    if not config.general_task_specs:
        return None
    return load_general_tasks(config.general_task_specs, include_paths(), limit=config.eval_max_examples)


def _task_records(path: str) -> list[dict]:
    """Task records checked by the training-data loader (same formats, file:line errors)."""
    return [{"messages": conversation} for conversation in load_conversations(path, source="--eval_data")]


def read_general_texts(path: str) -> list[str]:
    records = _read_jsonl(path, "general_text")
    for number, record in enumerate(records, start=1):
        if not isinstance(record.get("text"), str):
            raise DataError(f"{path}: record {number} has no string 'text' field (--general_text)")
    return [record["text"] for record in records]


def data_workers(config: RunConfig) -> int:
    """--data_workers, or one per usable CPU core (at most MAX_DATA_WORKERS) when it is 0."""
    if config.data_workers:
        return config.data_workers
    return max(1, min(MAX_DATA_WORKERS, len(os.sched_getaffinity(0))))


def prepare_training_data(
    config: RunConfig, train_file: Path, tokenizer: Any, rank: int, world: int
) -> PreparedData:
    """The run's tokenised data, through the cache (dsforget.data_cache). Collective.

    Rank 0 hashes the data file and tokenises it into the cache, or finds it there; then it tells
    the other ranks the entry's key (only rank 0 reads the whole file) and they read the entry
    memory-mapped. Where the cache directory is node-local, the first rank of another node to
    take the entry's lock builds that node's copy. Every wait here, the other ranks' included, is
    bounded by --data_timeout_s. A user error on rank 0 (a bad record) is raised on every rank.
    """
    from deepspeed import comm

    data_config = DataConfig(
        path=str(train_file),
        format=config.data_format,
        max_length=config.max_length,
        packing=config.packing,
        validation_fraction=config.validation_fraction,
        seed=config.seed,
    )
    cache_dir = Path(config.data_cache_dir) if config.data_cache_dir else default_data_cache_dir()
    workers, timeout = data_workers(config), config.data_timeout_s
    phase = f"tokenising {train_file} into the data cache {cache_dir}"
    with faults.collective_phase(phase, timeout, "data_timeout_s"):
        data = key = failure = None
        if rank == 0:
            try:
                data, key = prepare_cached(data_config, tokenizer, cache_dir, workers, timeout)
            except UserInputError as error:
                failure = error
        if world > 1:
            message = [key if failure is None else failure]
            comm.broadcast_object_list(message, src=0)
            if isinstance(message[0], UserInputError):
                failure = message[0]
            elif rank != 0:
                data, _ = prepare_cached(data_config, tokenizer, cache_dir, workers, timeout, key=message[0])
        if failure is not None:
            raise failure
        if world > 1:
            comm.barrier()  # a node that built its own copy: the others wait here, not in a later collective
    return data
