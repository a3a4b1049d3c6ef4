"""Forgetting measurements: task gain against lost general ability, and how far weights moved.

Metrics are computed before and after fine-tuning on one plain (unsharded) copy of the model:
- ``task_exact_match``: greedy answers to held-out task records that equal the reference;
- ``fact_recall`` (lab): facts from pretraining still produced exactly;
- ``general_perplexity``: perplexity on general text the model was not fine-tuned on.
Drift is per module type: relative L2 distance ||W - W0|| / ||W0|| and the fraction of entries
that changed at all (MoFO and HFT leave most entries bit-identical; full fine-tuning does not).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .lab.corpus import Fact
from .lab.evaluate import fact_recall, perplexity, task_exact_match

HIGHER_IS_BETTER = {"task_exact_match": True, "fact_recall": True, "general_perplexity": False}

# Module type of a parameter, by name (Llama, Qwen2, Mistral and GPT-2 naming).
_CATEGORIES = (
    ("embedding", re.compile(r"embed_tokens|wte|wpe|embed_positions")),
    ("lm_head", re.compile(r"lm_head")),
    ("norm", re.compile(r"norm|ln_")),
    ("attention", re.compile(r"self_attn|attn|attention")),
    ("mlp", re.compile(r"mlp|feed_forward")),
)


def module_type(name: str) -> str:
    for category, pattern in _CATEGORIES:
        if pattern.search(name):
            return category
    return "other"


@dataclass(frozen=True)
class EvalSources:
    """What to score; every part is optional (a metric without data is left out)."""

    task_records: Sequence[dict] = field(default_factory=list)
    facts: Sequence[Fact] = field(default_factory=list)
    general_texts: Sequence[str] = field(default_factory=list)


def evaluate(model: torch.nn.Module, tokenizer: Any, sources: EvalSources) -> dict[str, float]:
    metrics = {}
    if sources.task_records:
        metrics["task_exact_match"] = task_exact_match(model, tokenizer, sources.task_records)
    if sources.facts:
        metrics["fact_recall"] = fact_recall(model, tokenizer, sources.facts)
    if sources.general_texts:
        metrics["general_perplexity"] = perplexity(model, tokenizer, sources.general_texts)
    return metrics


def drift(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per module type (and 'all'): relative L2 distance from the base and share of changed entries."""
    sums: dict[str, list[float]] = {}
    for name, before in base.items():
        if name not in tuned or not before.is_floating_point():
            continue
        after = tuned[name].to(before.dtype)
        for category in (module_type(name), "all"):
            acc = sums.setdefault(category, [0.0, 0.0, 0.0, 0.0])
            acc[0] += float((after.double() - before.double()).pow(2).sum())
            acc[1] += float(before.double().pow(2).sum())
            acc[2] += float((after != before).sum())
            acc[3] += before.numel()
    return {
        category: {"relative_l2": math.sqrt(d / max(n, 1e-30)), "changed_fraction": changed / count}
        for category, (d, n, changed, count) in sums.items()
    }


def forgetting_summary(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Task gain (after - before) and forgetting (how much each general metric got worse)."""
    summary = {}
    if "task_exact_match" in before:
        summary["task_gain"] = after["task_exact_match"] - before["task_exact_match"]
    if "fact_recall" in before:
        summary["fact_recall_lost"] = before["fact_recall"] - after["fact_recall"]
    if "general_perplexity" in before:
        summary["perplexity_increase"] = after["general_perplexity"] / before["general_perplexity"] - 1
    return summary


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
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_report(report, directory / "report.png")
