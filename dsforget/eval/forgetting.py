"""Forgetting measurements: task gain against lost general ability, and how far weights moved.

Metrics are computed before and after fine-tuning, by one process on a plain model or by every
rank on its slice of the items with the model DeepSpeed holds (``Ranks``):
- ``task_exact_match``: greedy answers to held-out task records that equal the reference;
- ``fact_recall`` (lab): facts from pretraining still produced exactly;
- ``skill_exact_match`` (aligned lab): held-out lists of the chat skills the base could do;
- ``general_perplexity``: perplexity on general text the model was not fine-tuned on.
Drift is per module type: relative L2 distance ||W - W0|| / ||W0|| and the fraction of entries
that changed at all (MoFO and HFT leave most entries bit-identical; full fine-tuning does not).
``DriftSums`` takes one parameter at a time, so a whole model is never held at once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..lab.corpus import Fact
from ..lab.evaluate import ONE_PROCESS, Ranks, fact_recall, perplexity, task_exact_match

HIGHER_IS_BETTER = {
    "task_exact_match": True,
    "fact_recall": True,
    "skill_exact_match": True,
    "general_perplexity": False,
}

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
    skill_records: Sequence[dict] = field(default_factory=list)


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    sources: EvalSources,
    ranks: Ranks = ONE_PROCESS,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Every metric `sources` has data for; with `ranks`, collective (each rank scores a slice).
    `batch_size`: items per forward pass (None: each metric's default)."""
    sizes = {} if batch_size is None else {"batch_size": batch_size}
    metrics = {}
    if sources.task_records:
        metrics["task_exact_match"] = task_exact_match(
            model, tokenizer, sources.task_records, ranks=ranks, **sizes
        )
    if sources.facts:
        metrics["fact_recall"] = fact_recall(model, tokenizer, sources.facts, ranks=ranks, **sizes)
    if sources.skill_records:
        metrics["skill_exact_match"] = task_exact_match(
            model, tokenizer, sources.skill_records, ranks=ranks, **sizes
        )
    if sources.general_texts:
        metrics["general_perplexity"] = perplexity(
            model, tokenizer, sources.general_texts, ranks=ranks, **sizes
        )
    return metrics


class DriftSums:
    """Drift accumulated one parameter at a time: `add` each (base, tuned) pair, then `result`.

    Sums run in float64 over chunks of ``CHUNK`` entries on the tensors' own device, so the
    temporaries stay small whatever the parameter's size.
    """

    CHUNK = 1 << 24

    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = {}

    def add(self, name: str, before: torch.Tensor, after: torch.Tensor) -> None:
        if not before.is_floating_point():
            return
        before = before.reshape(-1)
        after = after.reshape(-1).to(device=before.device, dtype=before.dtype)
        moved = norm = changed = 0.0
        for start in range(0, before.numel(), self.CHUNK):
            b, a = before[start : start + self.CHUNK], after[start : start + self.CHUNK]
            moved += float((a.double() - b.double()).pow(2).sum())
            norm += float(b.double().pow(2).sum())
            changed += float((a != b).sum())
        for category in (module_type(name), "all"):
            acc = self._sums.setdefault(category, [0.0, 0.0, 0.0, 0.0])
            acc[0] += moved
            acc[1] += norm
            acc[2] += changed
            acc[3] += before.numel()

    def result(self) -> dict[str, dict[str, float]]:
        """Per module type (and 'all'): relative L2 distance and share of changed entries."""
        return {
            category: {"relative_l2": math.sqrt(d / max(n, 1e-30)), "changed_fraction": changed / count}
            for category, (d, n, changed, count) in self._sums.items()
        }


def drift(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per module type (and 'all'): relative L2 distance from the base and share of changed entries."""
    sums = DriftSums()
    for name, before in base.items():
        if name in tuned:
            sums.add(name, before, tuned[name])
    return sums.result()


def forgetting_summary(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """Task gain (after - before) and forgetting (how much each general metric got worse)."""
    summary = {}
    if "task_exact_match" in before:
        summary["task_gain"] = after["task_exact_match"] - before["task_exact_match"]
    if "fact_recall" in before:
        summary["fact_recall_lost"] = before["fact_recall"] - after["fact_recall"]
    if "skill_exact_match" in before:
        summary["skills_lost"] = before["skill_exact_match"] - after["skill_exact_match"]
    if "general_perplexity" in before:
        summary["perplexity_increase"] = after["general_perplexity"] / before["general_perplexity"] - 1
    return summary
