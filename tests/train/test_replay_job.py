"""Mixing and replay through the job: 2 CPU ranks, ZeRO-3, the tiny lab."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_finetune import finetune, metrics

pytestmark = pytest.mark.distributed


def task_files(lab_cache: Path, folder: Path) -> tuple[Path, Path]:
    """Two small task files cut from the lab's task: 48 and 32 records (76 training rows after
    the 5% validation split; with replay 0.25 an epoch is 101 slots, 6 steps of 16)."""
    from dsforget.lab import LabConfig, build_lab

    lines = build_lab(LabConfig.preset("tiny"), lab_cache / "lab").task_train.read_text().splitlines()
    folder.mkdir(parents=True, exist_ok=True)
    first, second = folder / "a.jsonl", folder / "b.jsonl"
    first.write_text("\n".join(lines[:48]) + "\n")
    second.write_text("\n".join(lines[48:80]) + "\n")
    return first, second


def test_mixed_run_with_replay_resumes_exactly_and_reports_shares(tmp_path: Path, lab_cache: Path) -> None:
    """Two weighted files and 25% replay of the lab's pretraining corpus: stopped after step 4
    (mid-epoch) and resumed to step 8 (past the epoch's end at step 6), the run gives the losses
    and final weights of one uninterrupted run, which only holds if the mixed stream's position
    is restored exactly. report.json names the sources with expected and realised shares."""
    first, second = task_files(lab_cache, tmp_path / "data")
    common = ["--data", f"{first}:0.7,{second}:0.3", "--replay_ratio", "0.25"]
    common += ["--lr_schedule", "constant", "--warmup_steps", "0", "--log_every", "1", "--no-export"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    finetune(straight, lab_cache, "--max_steps", "8", *common)
    finetune(split, lab_cache, "--max_steps", "4", *common)
    finetune(split, lab_cache, "--max_steps", "8", *common)
    losses = [[m["loss"] for m in metrics(run) if "loss" in m] for run in (straight, split)]
    assert len(losses[0]) == 8 and losses[0] == losses[1]
    a, b = (json.loads((run / "report.json").read_text()) for run in (straight, split))
    assert a["after"] == b["after"] and a["drift"] == b["drift"]
    assert a["data"] == b["data"]
    config = json.loads((straight / "config.json").read_text())
    assert config["replay_text"] == "lab" and config["replay_ratio"] == 0.25
    sources = a["data"]["sources"]
    assert [(s["name"], s["kind"], s["weight"]) for s in sources] == [
        (str(first), "task", 0.7),
        (str(second), "task", 0.3),
        ("lab pretraining corpus", "replay", 0.25),
    ]
    assert [s["expected_share"] for s in sources] == pytest.approx([0.525, 0.225, 0.25])
    assert sum(s["drawn"] for s in sources) == 8 * 16 and all(s["drawn"] > 0 for s in sources)
    # 128 draws: each share within 0.15 (over 3 standard deviations)
    assert all(abs(s["realised_share"] - s["expected_share"]) < 0.15 for s in sources), sources
