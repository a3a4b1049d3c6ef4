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
from ..mixing import ConcatExamples, Mixture, build_mixture, parse_data_spec
from . import faults
from .run_config import RunConfig

# Processes that tokenise by default: one per core this process may use, at most this many (more
# rarely pays: each starts its own interpreter and a copy of the tokenizer).
MAX_DATA_WORKERS = 16

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model*.safetensors")


@dataclass(frozen=True)
class Replay:
    """Replay data: the file, what to call it in the report, the share of the stream and the
    held-out texts (every text that measures forgetting) it must not train on."""

    path: Path
    name: str
    ratio: float
    heldout: frozenset[str]


@dataclass(frozen=True)
class Inputs:
    """Everything the run reads from disk, resolved from the config (the lab or user files)."""

    model_dir: Path
    train_file: Path  # the first (with one file: the only) training file
    eval_sources: EvalSources
    general_tasks: GeneralTasks | None = None  # --general_tasks, loaded with their documents
    # --data as (file, weight) pairs; empty: train_file alone, the plain pipeline
    train_files: tuple[tuple[Path, float], ...] = ()
    replay: Replay | None = None  # --replay_text and --replay_ratio


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
    spec = parse_data_spec(config.data) if config.data else []
    files = tuple((Path(path), weight) for path, weight in spec)
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
        # Replay never trains on text that measures forgetting: the lab's held-out documents (a
        # separate draw, not in pretrain.jsonl) and --general_text's, dropped where equal.
        heldout = set(lab.load_heldout_texts()) | set(general)
        if config.replay_text == "lab":
            name = "lab pretraining corpus"
            replay = Replay(lab.general_train, name, config.replay_ratio, frozenset(heldout))
        else:
            replay = _replay_file(config, heldout)
        files = files or ((lab.task_train, 1.0),)
        return Inputs(model_dir, files[0][0], sources, tasks, _mixed(files, replay), replay)
    general_texts = read_general_texts(config.general_text) if config.general_text else []
    sources = EvalSources(
        task_records=_task_records(config.eval_data)[:limit] if config.eval_data else [],
        general_texts=general_texts[:limit],
    )
    model_dir = check_model_dir(config.model)
    replay = _replay_file(config, set(general_texts))
    tasks = _general_tasks(config, list)
    return Inputs(model_dir, files[0][0], sources, tasks, _mixed(files, replay), replay)


def _replay_file(config: RunConfig, heldout: set[str]) -> Replay | None:
    """--replay_text FILE, checked to exist (named by its flag)."""
    if config.replay_ratio == 0 or config.replay_text is None:
        return None
    path = Path(config.replay_text)
    if not path.is_file():
        raise InputFileError(f"replay text file {path} does not exist (--replay_text)")
    return Replay(path, str(path), config.replay_ratio, frozenset(heldout))


def _mixed(files: tuple[tuple[Path, float], ...], replay: Replay | None) -> tuple[tuple[Path, float], ...]:
    """The files to mix, or () where one file without replay takes the plain pipeline."""
    return files if len(files) > 1 or replay is not None else ()


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


@dataclass(frozen=True)
class TrainingData:
    """The run's examples: ``train`` (every source's rows, concatenated) and ``validation`` (the
    task files'); ``task_train`` the task files' rows alone (CoFiTune's importance on training
    data); ``mixture`` the seeded stream over ``train``, None for one file without replay (then
    batches come from ``DistributedSampler`` over ``train``, as they always did)."""

    train: Any
    validation: Any
    task_train: Any
    mixture: Mixture | None = None

    @property
    def epoch_examples(self) -> int:
        """Examples (slots) in one epoch: the mixture's epoch, or the training rows."""
        return self.mixture.epoch_size if self.mixture is not None else len(self.train)


def prepare_training_data(
    config: RunConfig, inputs: Inputs, tokenizer: Any, rank: int, world: int
) -> TrainingData:
    """Every source of the run tokenised through the cache (``prepare_data_file``), and their
    mixture (dsforget.mixing) where there are several or replay. Collective."""
    if not inputs.train_files:
        data = prepare_data_file(config, _task_config(config, inputs.train_file), tokenizer, rank, world)
        return TrainingData(data.train, data.validation, data.train)
    parts = [
        prepare_data_file(config, _task_config(config, path), tokenizer, rank, world)
        for path, _ in inputs.train_files
    ]
    sizes = [
        (str(path), weight, len(part.train))
        for (path, weight), part in zip(inputs.train_files, parts, strict=True)
    ]
    rows = [part.train for part in parts]
    replay = None
    if inputs.replay is not None:
        text_config = DataConfig(
            path=str(inputs.replay.path),
            format="jsonl",
            max_length=config.max_length,
            packing=config.packing,
            seed=config.seed,
            text=True,
            exclude_texts=inputs.replay.heldout,
        )
        replay_rows = prepare_data_file(config, text_config, tokenizer, rank, world).train
        rows.append(replay_rows)
        replay = (inputs.replay.name, len(replay_rows))
    mixture = build_mixture(sizes, replay, config.replay_ratio, config.seed)
    validation = ConcatExamples([part.validation for part in parts])
    task_train = ConcatExamples([part.train for part in parts])
    return TrainingData(ConcatExamples(rows), validation, task_train, mixture)


def _task_config(config: RunConfig, path: Path) -> DataConfig:
    return DataConfig(
        path=str(path),
        format=config.data_format,
        max_length=config.max_length,
        packing=config.packing,
        validation_fraction=config.validation_fraction,
        seed=config.seed,
    )


def prepare_data_file(
    config: RunConfig, data_config: DataConfig, tokenizer: Any, rank: int, world: int
) -> PreparedData:
    """One file's tokenised data, through the cache (dsforget.data_cache). Collective.

    Rank 0 hashes the data file and tokenises it into the cache, or finds it there; then it tells
    the other ranks the entry's key (only rank 0 reads the whole file) and they read the entry
    memory-mapped. Where the cache directory is node-local, the first rank of another node to
    take the entry's lock builds that node's copy. Every wait here, the other ranks' included, is
    bounded by --data_timeout_s. A user error on rank 0 (a bad record) is raised on every rank.
    """
    from deepspeed import comm

    train_file = data_config.path
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
