"""Continual stages: the stages file, the score matrix, and a 2-stage HFT run on the tiny lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launcher import REPO

from dsforget.experiments.continual import read_stages, stage_run_config, transfer_matrix, write_result
from dsforget.lab.tasks import TRANSFORMS


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stages: []", "needs a non-empty list under 'stages'"),
        ("stages: [{name: a}]", r"stages\[0\]: give either 'lab_task' or 'data'"),
        ("stages: [{name: a, data: x.jsonl}]", r"stages\[0\]: 'data' needs an 'eval_data'"),
        ("stages: [{name: a, lab_task: reverse, lrr: 1}]", r"stages\[0\]: unknown run config key 'lrr'"),
        ("run: {output_dir: x}\nstages: [{name: a, lab_task: reverse}]", "'output_dir' is set by the"),
        ("stages: [{name: a, lab_task: sort}, {name: a, lab_task: reverse}]", "names must be distinct"),
        ("stage: []", "needs a non-empty list under 'stages'"),
    ],
)
def test_bad_stages_files_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "stages.yaml", text)
    with pytest.raises(ValueError, match=message) as error:
        read_stages(path)
    assert str(path) in str(error.value)


def test_stage_configs_chain_checkpoints_and_seeds(tmp_path: Path) -> None:
    """Catches a stage that restarts from the base model, or reuses stage 0's seed (HFT would
    then freeze the same half at every stage instead of resampling)."""
    stages = read_stages(
        write(
            tmp_path / "s.yaml",
            "run: {method: hft, seed: 5, lab_preset: tiny}\n"
            "stages: [{name: a, lab_task: reverse}, {name: b, lab_task: sort, lr: 0.01}]",
        )
    )
    first = stage_run_config(stages, 0, tmp_path, "a.jsonl", "a_eval.jsonl", None)
    second = stage_run_config(stages, 1, tmp_path, "b.jsonl", "b_eval.jsonl", "prev/hf_model")
    assert (first["seed"], second["seed"]) == (5, 6)
    assert "init_from" not in first and second["init_from"] == "prev/hf_model"
    assert second["lr"] == 0.01 and "lr" not in first
    assert second["output_dir"] == str(tmp_path / "stage1-b") and second["export"] is True
    bad = read_stages(write(tmp_path / "bad.yaml", "stages: [{name: a, lab_task: reverse, lr: -1}]"))
    with pytest.raises(ValueError, match=r"stage 0 \(a\): lr=-1 must be > 0"):
        stage_run_config(bad, 0, tmp_path, "a.jsonl", "a_eval.jsonl", None)


def test_backward_transfer_is_the_mean_change_since_learning() -> None:
    scores = [{"a": 0.9}, {"a": 0.5, "b": 0.8}, {"a": 0.3, "b": 0.6, "c": 0.7}]
    result = transfer_matrix(scores, ["a", "b", "c"])
    assert result["per_task_change"] == pytest.approx([0.3 - 0.9, 0.6 - 0.8])
    assert result["backward_transfer"] == pytest.approx(-0.4)


def test_result_file_is_strict_json(tmp_path: Path) -> None:
    """A non-finite score (a diverged stage's perplexity) was written as a bare NaN, which strict
    JSON parsers (JavaScript, jq) reject; it must be written as null."""
    result = {
        "general": [{"general_perplexity": float("nan")}],
        "transfer": {"backward_transfer": float("inf")},
    }
    text = write_result(result, tmp_path).read_text()
    parsed = json.loads(text, parse_constant=lambda constant: pytest.fail(f"bare {constant} in {text}"))
    assert parsed == {"general": [{"general_perplexity": None}], "transfer": {"backward_transfer": None}}


def test_lab_tasks_transform_the_same_word_lists() -> None:
    words = ["red", "cat", "boat"]
    assert TRANSFORMS["sort"][1](words) == ["boat", "cat", "red"]
    assert TRANSFORMS["rotate"][1](words) == ["cat", "boat", "red"]
    assert TRANSFORMS["reverse"][1](words) == ["boat", "cat", "red"]


@pytest.mark.distributed
def test_two_stage_hft_run_scores_every_earlier_task(tmp_path: Path, lab_cache: Path) -> None:
    """End to end: stage 1 must start from stage 0's exported weights with a new HFT half, and
    the matrix must score the first task again after the second stage."""
    stages = write(
        tmp_path / "stages.yaml",
        "run: {method: hft, lab_preset: tiny, max_steps: 8, micro_batch_size: 8, eval_max_examples: 20}\n"
        "stages: [{name: reverse, lab_task: reverse}, {name: sort, lab_task: sort}]",
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "DSFORGET_CACHE": str(lab_cache)}
    command = [sys.executable, str(REPO / "launch" / "continual.py"), "--stages", str(stages)]
    command += ["--output_dir", str(tmp_path / "run")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "continual.json").read_text())
    assert result["rows"] == ["base", "0 reverse", "1 sort"]
    assert set(result["task_scores"][1]) == {"reverse"}
    assert set(result["task_scores"][2]) == {"reverse", "sort"}
    assert all(0 <= v <= 1 for row in result["task_scores"] for v in row.values())
    assert len(result["general"]) == 3 and all("fact_recall" in row for row in result["general"])
    assert "backward transfer:" in done.stdout
    plans = [
        json.loads((tmp_path / "run" / d / "plan.json").read_text())
        for d in ("stage0-reverse", "stage1-sort")
    ]
    assert plans[0]["meta"]["seed"] + 1 == plans[1]["meta"]["seed"]
    assert plans[0]["params"] != plans[1]["params"], "HFT must draw a new half per stage"
    second = json.loads((tmp_path / "run" / "stage1-sort" / "config.json").read_text())
    assert second["init_from"] == str(tmp_path / "run" / "stage0-reverse" / "hf_model")
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "== stage" not in again.stdout, "finished stages must not rerun"
