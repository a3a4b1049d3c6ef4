"""Combinations such as ``hft+mofo`` and ``cofitune+mofo``: one rule per parameter from several plans.

The methods act on different axes, so their rules compose without ambiguity:
- frozen wins (HFT's or CoFiTune's choice of what trains);
- top-k applies to whatever still trains (MoFO's momentum filter);
- a row scale (CoFiTune's importance) scales the gradient of a dense or top-k rule;
- a pull towards the initial weights (l2) applies to whatever still trains, top-k or dense;
- frozen rows (HFT's or CoFiTune's choice inside a fused matrix) add up: a row frozen by any
  plan is frozen.
Two plans that both set a fraction, row scales or a pull for one parameter disagree: an error.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..optim.plan import FROZEN, MaskPlan, ParamRule, PlanError


def _merge(name: str, rules: Sequence[tuple[str, ParamRule]]) -> ParamRule:
    if any(rule.mode == "frozen" for _, rule in rules):
        return FROZEN
    fractions = {(method, rule.fraction) for method, rule in rules if rule.mode == "topk"}
    scales = [(method, rule.row_scale) for method, rule in rules if rule.row_scale is not None]
    if len({fraction for _, fraction in fractions}) > 1:
        raise PlanError(f"{name}: methods {sorted(m for m, _ in fractions)} set different top-k fractions")
    if len(scales) > 1:
        raise PlanError(f"{name}: methods {[m for m, _ in scales]} both set row scales")
    pulls = [(method, rule.pull) for method, rule in rules if rule.pull]
    if len(pulls) > 1:
        raise PlanError(f"{name}: methods {[m for m, _ in pulls]} both set a pull")
    frozen_rows = _union([r for _, rule in rules for r in rule.frozen_rows or ()])
    return ParamRule(
        "topk" if fractions else "dense",
        fraction=next(iter(fractions))[1] if fractions else None,
        row_scale=scales[0][1] if scales else None,
        pull=pulls[0][1] if pulls else 0.0,
        frozen_rows=tuple(frozen_rows) if frozen_rows else None,
    )


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, stop) row ranges merged into sorted, disjoint ones."""
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def compose(plans: Sequence[MaskPlan]) -> MaskPlan:
    """The combined plan of `plans`, all built for the same model."""
    names = list(plans[0].rules)
    for plan in plans[1:]:
        if set(plan.rules) != set(names):
            raise PlanError(f"plans {plans[0].method} and {plan.method} cover different parameters")
    rules = {name: _merge(name, [(plan.method, plan.rules[name]) for plan in plans]) for name in names}
    method = "+".join(plan.method for plan in plans)
    return MaskPlan(rules=rules, method=method, meta={plan.method: dict(plan.meta) for plan in plans})
