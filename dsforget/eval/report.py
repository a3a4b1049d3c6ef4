"""The run's report: report.json (its ``summary`` is what users and launch/compare.py read),
report.png, and the table printed at the end of a run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_atomic
from ..strict_json import dumps
from .forgetting import HIGHER_IS_BETTER, forgetting_summary


def format_table(report: Mapping[str, Any]) -> str:
    """The report as aligned text: metrics before/after, then drift per module type."""
    lines = [f"{'metric':<22}{'base':>12}{'tuned':>12}{'change':>12}"]
    for metric, before in report["before"].items():
        after = report["after"][metric]
        lines.append(f"{metric:<22}{before:>12.4g}{after:>12.4g}{after - before:>+12.4g}")
    for key, value in report["summary"].items():
        lines.append(f"{key:<22}{'':>12}{'':>12}{value:>+12.4g}")
    lines.append("")
    lines.append(f"{'drift':<22}{'rel. L2':>10}{'changed':>10}")
    for category, values in sorted(report["drift"].items()):
        lines.append(f"{category:<22}{values['relative_l2']:>10.4f}{values['changed_fraction']:>10.2%}")
    return "\n".join(lines)


def plot_report(report: Mapping[str, Any], path: str | Path) -> None:
    """One panel per metric (base against tuned, each on its own scale: perplexity is not a rate)
    and one of drift per module type, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(report["before"])
    drift_rows = sorted(k for k in report["drift"] if k != "all")
    figure, axes = plt.subplots(1, len(metrics) + 1, figsize=(3.2 * (len(metrics) + 1), 3.6))
    for axis, metric in zip(axes, metrics, strict=False):
        values = [report["before"][metric], report["after"][metric]]
        axis.bar(["base", "tuned"], values, color=["#8c8c8c", "#3b75af"])
        better = "higher" if HIGHER_IS_BETTER.get(metric, True) else "lower"
        axis.set_title(f"{metric}\n({better} is better)", fontsize=9)
        if HIGHER_IS_BETTER.get(metric, True) and max(values) <= 1:
            axis.set_ylim(0, 1)
    drift_axis = axes[-1]
    drift_axis.bar(drift_rows, [report["drift"][c]["relative_l2"] for c in drift_rows])
    drift_axis.set_title("relative L2 drift", fontsize=9)
    drift_axis.tick_params(axis="x", rotation=30, labelsize=7)
    figure.suptitle(f"{report['method']}: base against tuned")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(report: Mapping[str, Any], directory: str | Path) -> None:
    directory = Path(directory)
    write_atomic(directory / "report.json", dumps(report, indent=2) + "\n")  # NaN/inf as null
    plot_report(report, directory / "report.png")


def run_report(
    *,
    config: Any,
    plan: Any,
    optimizer: Any,
    sizes: Mapping[str, int],
    before: Mapping[str, float],
    after: Mapping[str, float],
    drift: Mapping[str, Mapping[str, float]],
    stats: Any,
    world: int,
    environment: Mapping[str, str],
    memory: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """report.json of a finished run: scores before and after, their ``summary`` (task gain and
    forgetting), drift, the training's cost and the environment. `sizes`: each parameter's
    number of entries (the full tensor's under ZeRO-3); `memory`: each rank's peaks
    (dsforget.train.memory)."""
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
            (name, size) for name, size in sizes.items() if name in plan.rules
        ),
        "before": dict(before),
        "after": dict(after),
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
    if memory is not None:
        report["memory"] = dict(memory)
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
