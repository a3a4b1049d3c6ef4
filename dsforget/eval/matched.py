"""Forgetting at matched task gain: methods compared where they reach the same task score along
their training trajectories, not at one step count.

A run's trajectory (report.json's ``trajectory``: the base model at step 0, then every
evaluation) is read as a path in the plane (task score, forgetting measure). At a task level L
the run's forgetting is interpolated linearly between the two evaluations where the task score
first reaches L; a run that never reaches L has no value there. The levels compared are spread
over the range every run reaches, so each method is read where it actually was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

TASK = "task_exact_match"
NO_COMMON_LEVEL = "no task level that every run reached above the base"
# forgetting measures derived from the general metrics at a point and at the base (higher: worse)
MEASURES = {
    "fact_recall_lost": ("fact_recall", lambda value, base: base - value),
    "skills_lost": ("skill_exact_match", lambda value, base: base - value),
    "perplexity_increase": ("general_perplexity", lambda value, base: value / base - 1),
}


def forgetting_along(trajectory: Sequence[Mapping[str, float]]) -> list[dict[str, float]]:
    """Each point of `trajectory` (step 0 first) as its step, task score and forgetting measures."""
    base = trajectory[0]
    points = []
    for point in trajectory:
        if TASK not in point:
            continue
        row = {"step": point["step"], TASK: point[TASK]}
        for measure, (metric, change) in MEASURES.items():
            if metric in point and metric in base:
                row[measure] = change(point[metric], base[metric])
        points.append(row)
    return points


def at_level(points: Sequence[Mapping[str, float]], level: float, measure: str) -> float | None:
    """`measure` where the task score first reaches `level` along `points`, linearly interpolated
    between the two evaluations around it; None when the run never reaches `level`."""
    for before, after in zip(points, points[1:], strict=False):
        if before[TASK] >= level:
            return before.get(measure)
        if after[TASK] >= level and measure in before and measure in after:
            share = (level - before[TASK]) / (after[TASK] - before[TASK])
            return before[measure] + share * (after[measure] - before[measure])
    if points and points[-1][TASK] >= level:
        return points[-1].get(measure)
    return None


def common_levels(runs: Mapping[str, Sequence[Mapping[str, float]]], count: int = 4) -> list[float]:
    """`count` task levels evenly spread above the highest base score up to the best score every
    run reaches (its trajectory's maximum); empty when some run never improved on the bases."""
    start = max(points[0][TASK] for points in runs.values())
    reached = min(max(point[TASK] for point in points) for points in runs.values())
    if reached <= start:
        return []
    return [start + (reached - start) * (index + 1) / count for index in range(count)]


def _least(values: Mapping[str, float | None]) -> str | None:
    """The name whose value is lowest, ignoring None; tied names joined by ' = ' (a measure every
    run lost alike favours none); None when there is none."""
    present = {name: value for name, value in values.items() if value is not None}
    if not present:
        return None
    lowest = min(present.values())
    return " = ".join(name for name, value in present.items() if abs(value - lowest) <= 1e-9)


def matched_gain(trajectories: Mapping[str, Sequence[Mapping[str, float]]], count: int = 4) -> dict[str, Any]:
    """The comparison of runs (name: report trajectory): for each common task level, each run's
    forgetting measures there, and the run that forgot least on each measure.

    A run that never improved on its base's task score has no level to be read at; it is left
    out of the levels (else it would leave none for the others) and listed in ``not_improved``
    with its best task score."""
    runs = {name: forgetting_along(trajectory) for name, trajectory in trajectories.items()}
    runs = {name: points for name, points in runs.items() if points}
    best = {name: max(point[TASK] for point in points) for name, points in runs.items()}
    not_improved = {name: best[name] for name, points in runs.items() if best[name] <= points[0][TASK]}
    runs = {name: points for name, points in runs.items() if name not in not_improved}
    levels = common_levels(runs, count) if runs else []
    rows = []
    for level in levels:
        row: dict[str, Any] = {"task_level": level, "runs": {}, "least_forgetting": {}}
        for name, points in runs.items():
            row["runs"][name] = {measure: at_level(points, level, measure) for measure in MEASURES}
        for measure in MEASURES:
            row["least_forgetting"][measure] = _least({name: v[measure] for name, v in row["runs"].items()})
        rows.append(row)
    return {"task_metric": TASK, "levels": rows, "not_improved": not_improved}


def measured(result: Mapping[str, Any]) -> list[str]:
    """The forgetting measures some run has a value for (e.g. skills_lost only in an aligned lab)."""
    return [
        measure
        for measure in MEASURES
        if any(values.get(measure) is not None for row in result["levels"] for values in row["runs"].values())
    ]


def format_matched(result: Mapping[str, Any]) -> str:
    """The comparison as text: one block per forgetting measure, a row per task level, and the
    runs left out because they never improved on the task."""
    left_out = result.get("not_improved") or {}
    note = (
        "left out, never above the base's task score: "
        + ", ".join(f"{name} (best {best:.3f})" for name, best in left_out.items())
        if left_out
        else ""
    )
    if not result["levels"]:
        return "\n".join(filter(None, [f"matched task gain: {NO_COMMON_LEVEL}", note]))
    names = list(result["levels"][0]["runs"])
    lines = []
    for measure in measured(result):
        lines.append(f"{measure} at matched {result['task_metric']}")
        lines.append(f"{'task level':<12}" + "".join(f"{name:>16}" for name in names) + "  least")
        for row in result["levels"]:
            cells = "".join(
                f"{'-' if row['runs'][n][measure] is None else format(row['runs'][n][measure], '+.3f'):>16}"
                for n in names
            )
            lines.append(f"{row['task_level']:<12.3f}{cells}  {row['least_forgetting'][measure] or '-'}")
        lines.append("")
    return "\n".join([*lines, note]).rstrip()


def tuned_view(
    result: Mapping[str, Any], method_of: Mapping[str, str], group_of: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Each method's frontier over its runs (e.g. learning rates): at every level, the least
    forgetting any of its settings shows there, and the method that forgot least.

    With `group_of` (run -> its setting, runs of one setting differing only in a random draw such
    as HFT's plan seed), a setting counts with its mean over the draws that reach the level: the
    best lucky draw is not a setting a user can choose."""
    rows = []
    for level in result["levels"]:
        settings: dict[tuple[str, str], dict[str, list[float]]] = {}  # (method, setting): values
        for name, values in level["runs"].items():
            setting = (method_of[name], (group_of or {}).get(name, name))
            seen = settings.setdefault(setting, {measure: [] for measure in MEASURES})
            for measure, value in values.items():
                if value is not None:
                    seen[measure].append(value)
        methods: dict[str, dict[str, float | None]] = {}
        for (method, _), seen in settings.items():
            best = methods.setdefault(method, dict.fromkeys(MEASURES))
            for measure, values in seen.items():
                value = sum(values) / len(values) if values else None
                if value is not None and (best[measure] is None or value < best[measure]):
                    best[measure] = value
        least = {measure: _least({m: v[measure] for m, v in methods.items()}) for measure in MEASURES}
        rows.append({"task_level": level["task_level"], "runs": methods, "least_forgetting": least})
    in_levels = {method for row in rows for method in row["runs"]}
    not_improved: dict[str, float] = {}
    for name, best in (result.get("not_improved") or {}).items():
        if method_of[name] not in in_levels:
            not_improved[method_of[name]] = max(best, not_improved.get(method_of[name], best))
    return {"task_metric": result["task_metric"], "levels": rows, "not_improved": not_improved}


def seed_spread(result: Mapping[str, Any], group_of: Mapping[str, str]) -> dict[str, Any]:
    """Runs that differ only in a random draw (e.g. HFT's plan seed) grouped: at every level,
    the mean, lowest and highest forgetting over the group's runs that reach it, and how many."""
    rows = []
    for level in result["levels"]:
        groups: dict[str, dict[str, list[float]]] = {}
        for name, values in level["runs"].items():
            seen = groups.setdefault(group_of[name], {measure: [] for measure in MEASURES})
            for measure, value in values.items():
                if value is not None:
                    seen[measure].append(value)
        rows.append(
            {
                "task_level": level["task_level"],
                "groups": {
                    group: {
                        measure: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "runs": len(v)}
                        if v
                        else None
                        for measure, v in seen.items()
                    }
                    for group, seen in groups.items()
                },
            }
        )
    return {"task_metric": result["task_metric"], "levels": rows}


def format_spread(spread: Mapping[str, Any]) -> str:
    """Mean [lowest, highest] forgetting over each group's seeds, per level and measure."""
    if not spread["levels"]:
        return NO_COMMON_LEVEL
    lines = []
    for measure in MEASURES:
        if all(values[measure] is None for row in spread["levels"] for values in row["groups"].values()):
            continue
        lines.append(f"{measure}: mean [min, max] over seeds")
        for row in spread["levels"]:
            cells = []
            for group, values in row["groups"].items():
                value = values[measure]
                text = (
                    "-"
                    if value is None
                    else f"{value['mean']:+.3f} [{value['min']:+.3f}, {value['max']:+.3f}]"
                )
                cells.append(f"{group} {text}")
            lines.append(f"  task {row['task_level']:.3f}: " + "; ".join(cells))
    return "\n".join(lines)
