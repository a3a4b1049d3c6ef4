"""Forgetting measurements: task gain against lost general ability, and how far weights moved.

Metrics are computed before and after fine-tuning on one plain (unsharded) copy of the model:
- ``task_exact_match``: greedy answers to held-out task records that equal the reference;
- ``fact_recall`` (lab): facts from pretraining still produced exactly;
- ``general_perplexity``: perplexity on general text the model was not fine-tuned on.
Drift is per module type: relative L2 distance ||W - W0|| / ||W0|| and the fraction of entries
that changed at all (MoFO and HFT leave most entries bit-identical; full fine-tuning does not).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..lab.corpus import Fact
from ..lab.evaluate import fact_recall, perplexity, task_exact_match

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
