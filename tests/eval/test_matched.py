"""Forgetting at matched task gain (dsforget.eval.matched) against a hand-computed example."""

from __future__ import annotations

import pytest

from dsforget.eval.matched import at_level, forgetting_along, format_matched, matched_gain, tuned_view


def point(step: int, task: float, recall: float, ppl: float) -> dict:
    return {"step": step, "task_exact_match": task, "fact_recall": recall, "general_perplexity": ppl}


A = [point(0, 0.0, 1.0, 2.0), point(10, 0.4, 0.8, 3.0), point(20, 0.8, 0.9, 2.4)]
B = [point(0, 0.0, 1.0, 2.0), point(10, 0.2, 0.95, 2.2), point(20, 0.6, 0.83, 2.6)]


def test_forgetting_interpolated_where_each_run_reaches_the_common_levels() -> None:
    """Levels 0.2, 0.4, 0.6 (B reaches 0.6 at most). By hand: A at 0.2 is halfway from the base
    to step 10 (recall lost 0.1, perplexity +25%); B at 0.4 halfway between its steps 10 and 20."""
    result = matched_gain({"A": A, "B": B}, count=3)
    assert [row["task_level"] for row in result["levels"]] == pytest.approx([0.2, 0.4, 0.6])
    expected = {  # (recall lost, perplexity increase) per level
        "A": [(0.1, 0.25), (0.2, 0.5), (0.15, 0.35)],
        "B": [(0.05, 0.1), (0.11, 0.2), (0.17, 0.3)],
    }
    for index, row in enumerate(result["levels"]):
        for run, values in expected.items():
            lost, increase = values[index]
            assert row["runs"][run]["fact_recall_lost"] == pytest.approx(lost), (run, index)
            assert row["runs"][run]["perplexity_increase"] == pytest.approx(increase), (run, index)
    assert [row["least_forgetting"]["fact_recall_lost"] for row in result["levels"]] == ["B", "B", "A"]
    assert [row["least_forgetting"]["perplexity_increase"] for row in result["levels"]] == ["B", "B", "B"]


def test_a_level_never_reached_has_no_value_and_no_common_level_is_said() -> None:
    points = forgetting_along(B)
    assert at_level(points, 0.7, "fact_recall_lost") is None
    flat = [point(0, 0.0, 1.0, 2.0), point(10, 0.0, 0.5, 4.0)]
    assert matched_gain({"flat": flat})["levels"] == []
    # a run that never learns the task is left out and named, not allowed to empty the comparison
    result = matched_gain({"A": A, "flat": flat}, count=2)
    assert [row["task_level"] for row in result["levels"]] == pytest.approx([0.4, 0.8])
    assert set(result["levels"][0]["runs"]) == {"A"} and result["not_improved"] == {"flat": 0.0}
    assert "flat (best 0.000)" in format_matched(result)
    assert tuned_view(result, {"A": "a", "flat": "f"})["not_improved"] == {"f": 0.0}


def test_tuned_view_takes_each_methods_best_run_at_each_level() -> None:
    worse_a = [point(0, 0.0, 1.0, 2.0), point(10, 0.6, 0.5, 6.0)]
    result = matched_gain({"a@1e-3": A, "a@3e-3": worse_a, "b": B}, count=3)
    tuned = tuned_view(result, {"a@1e-3": "a", "a@3e-3": "a", "b": "b"})
    first = tuned["levels"][0]
    assert set(first["runs"]) == {"a", "b"}
    assert first["runs"]["a"]["fact_recall_lost"] == pytest.approx(0.1)  # A's, not worse_a's 1/6
    assert tuned["levels"][-1]["least_forgetting"]["fact_recall_lost"] == "a"


def test_seed_spread_gives_mean_and_range_over_a_groups_draws() -> None:
    from dsforget.eval.matched import seed_spread

    result = matched_gain({"hft/seed0": A, "hft/seed1": B, "full": A}, count=3)
    spread = seed_spread(result, {"hft/seed0": "hft", "hft/seed1": "hft", "full": "full"})
    first = spread["levels"][0]["groups"]["hft"]["fact_recall_lost"]
    assert first == {
        "mean": pytest.approx(0.075),
        "min": pytest.approx(0.05),
        "max": pytest.approx(0.1),
        "runs": 2,
    }
    assert spread["levels"][0]["groups"]["full"]["fact_recall_lost"]["runs"] == 1


def test_skills_measure_and_ties_favour_no_run() -> None:
    """An aligned lab's skills are a forgetting measure; runs that lost them alike are a tie,
    and a lab without skills prints no skills block."""

    def with_skills(points: list[dict], skills: list[float]) -> list[dict]:
        return [{**p, "skill_exact_match": s} for p, s in zip(points, skills, strict=True)]

    result = matched_gain(
        {"A": with_skills(A, [0.9, 0.0, 0.0]), "B": with_skills(B, [0.9, 0.0, 0.0])}, count=3
    )
    # at 0.2 A is halfway from its base to step 10 (0.45 lost), B at its step 10 (0.9 lost)
    assert [row["least_forgetting"]["skills_lost"] for row in result["levels"]] == ["A", "A = B", "A = B"]
    assert result["levels"][1]["runs"]["A"]["skills_lost"] == pytest.approx(0.9)
    assert "skills_lost at matched" in format_matched(result)
    assert "skills_lost" not in format_matched(matched_gain({"A": A, "B": B}, count=3))


def test_tuned_view_counts_a_setting_by_its_mean_over_draws() -> None:
    """Two plan seeds at one lr are one setting: the tuned view takes their mean (0.075 at the
    first level: A's 0.1 and B's 0.05), not the luckier draw."""
    lucky = [point(0, 0.0, 1.0, 2.0), point(10, 0.6, 0.99, 2.0)]
    result = matched_gain({"h@1/seed0": A, "h@1/seed1": B, "full": lucky}, count=3)
    groups = {"h@1/seed0": "h@1", "h@1/seed1": "h@1", "full": "full"}
    tuned = tuned_view(result, {"h@1/seed0": "h", "h@1/seed1": "h", "full": "full"}, groups)
    assert tuned["levels"][0]["runs"]["h"]["fact_recall_lost"] == pytest.approx(0.075)
    assert tuned_view(result, {"h@1/seed0": "h", "h@1/seed1": "h", "full": "full"})["levels"][0]["runs"]["h"][
        "fact_recall_lost"
    ] == pytest.approx(0.05)
