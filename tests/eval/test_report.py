"""The report's trajectory (the scores along training) and its plot (dsforget.eval.report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsforget.eval.report import format_table, general_tasks_section, plot_report, trajectory

BEFORE = {"task_exact_match": 0.0, "fact_recall": 1.0, "general_perplexity": 3.0}


def test_trajectory_starts_at_the_base_and_keeps_the_last_score_of_a_step(tmp_path: Path) -> None:
    """Catches loss-only records counted as points, a missing base point, and a step evaluated
    twice (a resumed attempt) appearing twice."""
    metrics = tmp_path / "metrics.jsonl"
    records = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "validation_loss": 1.5, "task_exact_match": 0.1, "fact_recall": 0.9},
        {"step": 4, "task_exact_match": 0.3, "fact_recall": 0.8},
        {"step": 4, "task_exact_match": 0.4, "fact_recall": 0.7},  # the resumed attempt's
        {"step": 5, "loss": 1.0},
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    points = trajectory(metrics, BEFORE)
    assert points == [
        {"step": 0, **BEFORE},
        {"step": 2, "task_exact_match": 0.1, "fact_recall": 0.9},
        {"step": 4, "task_exact_match": 0.4, "fact_recall": 0.7},
    ]
    assert trajectory(tmp_path / "absent.jsonl", BEFORE) == [{"step": 0, **BEFORE}]


@pytest.mark.parametrize("points", [1, 3])
def test_plot_draws_with_and_without_a_trajectory(tmp_path: Path, points: int) -> None:
    after = {"task_exact_match": 0.5, "fact_recall": 0.8, "general_perplexity": 3.5}
    report = {
        "method": "mofo",
        "before": BEFORE,
        "after": after,
        "drift": {"all": {"relative_l2": 0.1}, "mlp": {"relative_l2": 0.2}},
        "trajectory": [{"step": 0, **BEFORE}, {"step": 2, **after}, {"step": 4, **after}][:points],
    }
    plot_report(report, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_general_tasks_get_their_own_section_and_table_rows() -> None:
    """lm-eval scores arrive as flat lm_eval/<task>/<metric> keys beside dsforget's own: catches
    them leaking into before/after (which launch/continual.py and cofitune_search read), a delta of
    the wrong sign, and a task scored only after (added on resume) breaking the table."""
    before = {**BEFORE, "lm_eval/mmlu/acc": 0.5}
    after = {**BEFORE, "lm_eval/mmlu/acc": 0.45, "lm_eval/gsm8k/exact_match,strict-match": 0.2}
    section = general_tasks_section(before, after)
    assert section["before"] == {"mmlu": {"acc": 0.5}}
    assert section["delta"] == {"mmlu": {"acc": pytest.approx(-0.05)}, "gsm8k": {}}
    report = {
        "before": BEFORE,
        "after": BEFORE,
        "summary": {},
        "drift": {},
        "general_tasks": section,
    }
    table = format_table(report).splitlines()
    assert any(line.split() == ["mmlu", "acc", "0.5", "0.45", "-0.05"] for line in table), table
    assert any(line.split() == ["gsm8k", "exact_match,strict-match", "-", "0.2", "-"] for line in table), (
        table
    )
