"""More lab tasks for continual learning: the same word lists, other instructions.

A continual run needs a sequence of tasks the base model cannot do, each of which later stages
can overwrite. The lab's built task (reverse the words) is the first; the others reuse its word
lists with another transformation, so they need no rebuild of the cached base model and share
its tokenizer's vocabulary. Training and evaluation inputs stay disjoint as in the built task.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..atomic import write_atomic
from .build import LabArtifacts

TRANSFORMS: dict[str, tuple[str, Callable[[list[str]], list[str]]]] = {
    "reverse": ("Reverse the order of the words.", lambda words: words[::-1]),
    "sort": ("Sort the words alphabetically.", sorted),
    "rotate": ("Move the first word to the end.", lambda words: words[1:] + words[:1]),
    "double": ("Repeat every word twice.", lambda words: [w for word in words for w in (word, word)]),
}
LAB_TASKS = tuple(TRANSFORMS)


def _transformed(path: Path, task: str) -> list[dict]:
    instruction, transform = TRANSFORMS[task]
    records = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            words = json.loads(line)["input"].split()
            records.append(
                {"instruction": instruction, "input": " ".join(words), "output": " ".join(transform(words))}
            )
    return records


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
