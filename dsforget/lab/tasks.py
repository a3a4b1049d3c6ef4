"""More lab tasks for continual learning: the same word lists, other instructions.

A continual run needs a sequence of tasks the base model cannot do, each of which later stages
can overwrite. The lab's built task (reverse the words) is the first; the others reuse its word
lists with another transformation, so they need no rebuild of the cached base model and share
its tokenizer's vocabulary. Training and evaluation inputs stay disjoint as in the built task.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import write_atomic
from .build import LabArtifacts
from .skills import LAB_TASKS, TRANSFORMS, instruction_record


def _transformed(path: Path, task: str) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return [instruction_record(task, json.loads(line)["input"].split()) for line in file]


def write_lab_task(lab: LabArtifacts, task: str, directory: str | Path) -> tuple[Path, Path]:
    """(train, eval) JSONL files of lab task `task` in `directory` (written once, then reused)."""
    if task not in TRANSFORMS:
        raise ValueError(f"unknown lab task {task!r}; choose one of {', '.join(LAB_TASKS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / f"{task}-train.jsonl", directory / f"{task}-eval.jsonl")
    for source, target in zip((lab.task_train, lab.task_eval), paths, strict=True):
        if not target.exists():
            write_atomic(target, "".join(json.dumps(record) + "\n" for record in _transformed(source, task)))
    return paths
