"""The lab's general metrics as lm-evaluation-harness tasks, read from local JSONL files.

One mechanism (``--general_tasks``, dsforget/eval/general_tasks.py) then scores the lab and a real
checkpoint, and anyone can score a lab model with the ``lm_eval`` command line. Each task is a
YAML file with ``dataset_path: json`` and absolute ``data_files``, so nothing is downloaded:

- ``lab_fact_recall``: loglikelihood of each fact's answer after its prompt; lm-eval's ``acc``
  (is the answer what greedy decoding produces, token for token) is ``fact_recall``'s definition.
- ``lab_heldout``: loglikelihood_rolling of the held-out texts: lm-eval's ``word_perplexity``,
  ``byte_perplexity`` and ``bits_per_byte``. Not ``general_perplexity`` (per token, and lm-eval also
  scores each text's first token after its prefix token).
- ``lab_task``: generate_until on the task records' prompts rendered with the model's chat template,
  ``exact_match`` of the answer with surrounding whitespace ignored, at most as many new tokens as
  ``task_exact_match`` allows: the same score as ``task_exact_match`` on the same records.
- ``lab_skills`` (an aligned lab only): ``lab_task``'s scoring on the held-out chat-skill records,
  the same score as ``skill_exact_match``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..data import render_prompt, to_conversation
from .build import LabArtifacts
from .corpus import write_jsonl

LAB_TASKS = ("lab_fact_recall", "lab_heldout", "lab_task")
# in the name of the lab's task folder: a change to the files written here writes a new folder
FORMAT = 2

# task_exact_match's comparison: both sides stripped of surrounding whitespace
_STRIP = [r"^\s+", r"\s+$"]


def _local_json(path: Path) -> dict[str, Any]:
    """The data set part of a task config: one local JSONL file as its test split."""
    return {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path.resolve())}},
        "test_split": "test",
    }


def _write_task(directory: Path, config: dict[str, Any]) -> Path:
    path = directory / f"{config['task']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_exact_match_task(
    name: str,
    records: Sequence[dict],
    tokenizer: Any,
    directory: Path,
    read_from: Path | None = None,
    max_new_tokens: int | None = None,
) -> Path:
    """An lm-eval generate_until task scoring ``records`` (instruction or chat records ending with
    the assistant's answer) as ``task_exact_match`` does: the prompt rendered with `tokenizer`'s
    chat template, greedy answers, whitespace-stripped exact match, the same new-token budget
    (`max_new_tokens`, by default the longest reference's tokens + 8). Writes ``<name>.jsonl``
    and ``<name>.yaml`` into `directory`; the YAML names the data file in `read_from` (default
    `directory`), where it will be read."""
    rows = []
    for index, record in enumerate(records):
        conversation = to_conversation(record, f"{name}[{index}]")
        if conversation[-1]["role"] != "assistant":
            raise ValueError(f"{name}[{index}] must end with the assistant turn to compare against")
        rows.append(
            {"prompt": render_prompt(tokenizer, conversation[:-1]), "answer": conversation[-1]["content"]}
        )
    if max_new_tokens is None:
        max_new_tokens = (
            max(len(tokenizer(row["answer"].strip(), add_special_tokens=False)["input_ids"]) for row in rows)
            + 8
        )
    write_jsonl(directory / f"{name}.jsonl", rows)
    return _write_task(
        directory,
        {
            "task": name,
            **_local_json((read_from or directory) / f"{name}.jsonl"),
            "output_type": "generate_until",
            "doc_to_text": "prompt",
            "doc_to_target": "answer",
            "target_delimiter": "",
            "generation_kwargs": {
                "until": [tokenizer.eos_token],
                "max_gen_toks": max_new_tokens,
                "do_sample": False,
            },
            "metric_list": [
                {
                    "metric": "exact_match",
                    "aggregation": "mean",
                    "higher_is_better": True,
                    "regexes_to_ignore": _STRIP,
                }
            ],
        },
    )


def _write_lab_tasks(lab: LabArtifacts, directory: Path, read_from: Path) -> None:
    from transformers import AutoTokenizer

    _write_task(
        directory,
        {
            "task": "lab_fact_recall",
            **_local_json(lab.facts),
            "output_type": "loglikelihood",
            "doc_to_text": "prompt",
            "doc_to_target": "answer",
            "target_delimiter": "",  # the answers carry their leading space
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
    )
    _write_task(
        directory,
        {
            "task": "lab_heldout",
            **_local_json(lab.general_heldout),
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "text",
            "metric_list": [
                {
                    "metric": "word_perplexity",
                    "aggregation": "weighted_perplexity",
                    "higher_is_better": False,
                },
                {
                    "metric": "byte_perplexity",
                    "aggregation": "weighted_perplexity",
                    "higher_is_better": False,
                },
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
            ],
        },
    )
    tokenizer = AutoTokenizer.from_pretrained(lab.tokenizer_dir)
    write_exact_match_task("lab_task", lab.load_task_eval(), tokenizer, directory, read_from)
    skills = lab.load_skill_eval() if lab.skill_eval.exists() else []
    if skills:
        write_exact_match_task("lab_skills", skills, tokenizer, directory, read_from)


def lab_task_dir(lab: LabArtifacts) -> Path:
    """``<lab>/lm_eval-<FORMAT>/``, holding the lab's task YAMLs (``LAB_TASKS``) and the rendered task
    prompts; written on first use (into a temporary directory, then renamed into place, so every
    rank may ask at once and a reader never sees a partial one)."""
    target = lab.root / f"lm_eval-{FORMAT}"
    if target.is_dir():
        return target
    staging = Path(tempfile.mkdtemp(prefix=".lm_eval.tmp-", dir=lab.root))
    try:
        _write_lab_tasks(lab, staging, target)
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():  # else another process published the same files first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
