"""The run's report: report.json (its ``summary`` is what users and launch/compare.py read),
report.png, and the table printed at the end of a run."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_atomic
from ..strict_json import dumps
from .forgetting import HIGHER_IS_BETTER, forgetting_summary
from .general_tasks import PREFIX, split_scores


def format_table(report: Mapping[str, Any]) -> str:
    """The report as aligned text: metrics before/after, then drift per module type."""
    lines = [f"{'metric':<22}{'base':>12}{'tuned':>12}{'change':>12}"]
    for metric, before in report["before"].items():
        after = report["after"][metric]
        lines.append(f"{metric:<22}{before:>12.4g}{after:>12.4g}{after - before:>+12.4g}")
    for key, value in report["summary"].items():
        lines.append(f"{key:<22}{'':>12}{'':>12}{value:>+12.4g}")
    general = report.get("general_tasks")
    if general:
        lines.append("")
        lines.append(f"{'general task (lm-eval)':<40}{'base':>12}{'tuned':>12}{'change':>12}")
        for task, metrics in general["after"].items():
            for metric, after in metrics.items():
                before = general["before"].get(task, {}).get(metric)
                change = general["delta"].get(task, {}).get(metric)
                lines.append(
                    f"{task + ' ' + metric:<40}{_number(before):>12}{_number(after):>12}"
                    f"{_number(change, '+'):>12}"
                )
    lines.append("")
    lines.append(f"{'drift':<22}{'rel. L2':>10}{'changed':>10}")
    for category, values in sorted(report["drift"].items()):
        lines.append(f"{category:<22}{values['relative_l2']:>10.4f}{values['changed_fraction']:>10.2%}")
    return "\n".join(lines)


def _number(value: float | None, sign: str = "") -> str:
    """`value` in 4 significant digits; '-' where a run has none (a task added on resume)."""
    return "-" if value is None else f"{value:{sign}.4g}"


def general_tasks_section(
    before: Mapping[str, float], after: Mapping[str, float]
) -> dict[str, dict[str, dict[str, float]]]:
    """report.json's ``general_tasks``: lm-eval scores {task: {metric: value}} before and after,
    and their ``delta`` (after - before, where both exist; lower is better for perplexities)."""
    _, general_before = split_scores(dict(before))
    _, general_after = split_scores(dict(after))
    delta = {
        task: {
            metric: value - general_before[task][metric]
            for metric, value in metrics.items()
            if metric in general_before.get(task, {})
        }
        for task, metrics in general_after.items()
    }
    return {"before": general_before, "after": general_after, "delta": delta}


def _trajectory_panels(report: Mapping[str, Any]) -> list[str]:
    """The forgetting measures to draw against the task metric along training (needs two points)."""
    points = report.get("trajectory") or []
    with_task = [p for p in points if "task_exact_match" in p]
    if len(with_task) < 2:
        return []
    measures = ("fact_recall", "skill_exact_match", "general_perplexity")
    return [m for m in measures if all(m in p for p in with_task)]


def plot_report(report: Mapping[str, Any], path: str | Path) -> None:
    """One panel per metric (base against tuned, each on its own scale: perplexity is not a rate)
    and one of drift per module type; with a trajectory, a second row with the task metric
    against each forgetting measure along training, the base model marked. As a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(report["before"])
    drift_rows = sorted(k for k in report["drift"] if k != "all")
    along = _trajectory_panels(report)
    columns = len(metrics) + 1
    rows = 2 if along else 1
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=False):
        values = [report["before"][metric], report["after"][metric]]
        axis.bar(["base", "tuned"], values, color=["#8c8c8c", "#3b75af"])
        better = "higher" if HIGHER_IS_BETTER.get(metric, True) else "lower"
        axis.set_title(f"{metric}\n({better} is better)", fontsize=9)
        if HIGHER_IS_BETTER.get(metric, True) and max(values) <= 1:
            axis.set_ylim(0, 1)
    drift_axis = axes[0][-1]
    drift_axis.bar(drift_rows, [report["drift"][c]["relative_l2"] for c in drift_rows])
    drift_axis.set_title("relative L2 drift", fontsize=9)
    drift_axis.tick_params(axis="x", rotation=30, labelsize=7)
    if along:
        points = [p for p in report["trajectory"] if "task_exact_match" in p]
        for axis, measure in zip(axes[1], along, strict=False):
            xs, ys = [p["task_exact_match"] for p in points], [p[measure] for p in points]
            axis.plot(xs, ys, "-o", color="#3b75af", markersize=3)
            axis.plot(xs[:1], ys[:1], "*", color="#8c8c8c", markersize=12, label="base")
            for point in (points[0], points[-1]):
                axis.annotate(
                    f"step {point['step']}", (point["task_exact_match"], point[measure]), fontsize=7
                )
            axis.set_xlabel("task_exact_match", fontsize=8)
            axis.set_title(f"{measure} along training", fontsize=9)
            axis.legend(fontsize=7)
        for axis in axes[1][len(along) :]:
            axis.set_visible(False)
    figure.suptitle(f"{report['method']}: base against tuned")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(report: Mapping[str, Any], directory: str | Path) -> None:
    directory = Path(directory)
    write_atomic(directory / "report.json", dumps(report, indent=2) + "\n")  # NaN/inf as null
    plot_report(report, directory / "report.png")


def trajectory(metrics_file: Path, before: Mapping[str, float]) -> list[dict[str, float]]:
    """The evaluation metrics along training: the base model at step 0, then every record of
    metrics.jsonl that holds them (--eval_every, and the end), the last record of a step winning
    (a resumed run may evaluate a step again). The general tasks' scores are flat
    ``lm_eval/<task>/<metric>`` keys, as in metrics.jsonl."""
    points: dict[int, dict[str, float]] = {0: {"step": 0, **before}}
    if metrics_file.exists():
        for line in metrics_file.read_text().splitlines():
            record = json.loads(line)
            scores = {
                key: value
                for key, value in record.items()
                if (key in HIGHER_IS_BETTER or key.startswith(PREFIX)) and value is not None
            }
            if scores:
                points[record["step"]] = {"step": record["step"], **scores}
    return [points[step] for step in sorted(points)]


def run_report(
    *,
    config: Any,
    plan: Any,
    optimizer: Any,
    shapes: Mapping[str, tuple[int, ...]],
    before: Mapping[str, float],
    after: Mapping[str, float],
    drift: Mapping[str, Mapping[str, float]],
    stats: Any,
    world: int,
    environment: Mapping[str, str],
    memory: Mapping[str, Any] | None = None,
    trajectory: Sequence[Mapping[str, float]] = (),
) -> dict[str, Any]:
    """report.json of a finished run: scores before and after, their ``summary`` (task gain and
    forgetting), drift, the training's cost and the environment; the --general_tasks' scores (flat
    ``lm_eval/...`` keys in `before`/`after`) in their own ``general_tasks`` section. `shapes`: each
    parameter's shape (the full tensor's under ZeRO-3); `memory`: each rank's peaks
    (dsforget.train.memory); `trajectory`: the scores along training (``trajectory``)."""
    optimizer_bytes = sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    report = {
        "method": config.method,
        "model": config.model,
        "plan_digest": plan.digest,
        "trainable_share": optimizer.plan.trainable_share(  # the active draw when HFT resamples
            (name, shape) for name, shape in shapes.items() if name in plan.rules
        ),
        "before": split_scores(dict(before))[0],
        "after": split_scores(dict(after))[0],
        "drift": dict(drift),
        "train": {
            "steps": stats.steps,
            "seconds": round(stats.seconds, 2),
            "median_step_ms": None if stats.median_step_ms is None else round(stats.median_step_ms, 2),
            "final_loss": stats.last_loss,
            "validation_loss": stats.validation_loss,
            "world_size": world,
            "optimizer_state_mib_per_rank": round(optimizer_bytes / 2**20, 3),
        },
        "environment": dict(environment),
    }
    general = general_tasks_section(before, after)
    if general["before"] or general["after"]:
        report["general_tasks"] = general
    if memory is not None:
        report["memory"] = dict(memory)
    if trajectory:
        report["trajectory"] = [dict(point) for point in trajectory]
    report["summary"] = forgetting_summary(report["before"], report["after"])
    return report


def print_summary(report: Mapping[str, Any], directory: str | Path) -> None:
    """The run's closing lines: method, steps, ranks, step time, the table, where the report is."""
    train = report["train"]
    directory = Path(directory)
    step_time = "no step trained" if train["median_step_ms"] is None else f"{train['median_step_ms']} ms/step"
    memory = report.get("memory") or {}
    peaks = ""
    if memory.get("host_peak_bytes"):
        peaks = f", peak host memory {max(memory['host_peak_bytes']) / 2**30:.2f} GiB/rank"
    if memory.get("accelerator_peak_bytes"):
        peaks += f", peak accelerator memory {max(memory['accelerator_peak_bytes']) / 2**30:.2f} GiB/rank"
    print(
        f"\n{report['method']} on {report['model']}: {train['steps']} steps on {train['world_size']} ranks, "
        f"{step_time}{peaks}\n{format_table(report)}\n"
        f"report: {directory / 'report.json'}, {directory / 'report.png'}",
        flush=True,
    )
