"""Methods turn a model into a MaskPlan. Every method is a function (model, **options) -> plan.

A method name may combine registered methods with '+' (``hft+mofo``): each option goes to the
builders whose signature accepts it, and the plans are composed (see compose.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..optim.plan import MaskPlan, PlanError
from .cofitune.plan import cofitune_plan
from .compose import compose
from .freeze import freeze_plan
from .full import full_plan
from .hft import hft_plan
from .l2 import l2_plan
from .lora import check_combination, lora_plan
from .mofo import mofo_plan

METHODS: dict[str, Callable[..., MaskPlan]] = {
    "full": full_plan,
    "mofo": mofo_plan,
    "hft": hft_plan,
    "cofitune": cofitune_plan,
    "freeze": freeze_plan,
    "l2": l2_plan,
    "lora": lora_plan,
}


def _builders(method: str) -> list[tuple[str, Callable[..., MaskPlan]]]:
    parts = method.split("+")
    unknown = [part for part in parts if part not in METHODS]
    if unknown or len(set(parts)) != len(parts):
        raise PlanError(
            f"method {method!r}: {'unknown ' + repr(unknown[0]) if unknown else 'a part repeats'}; "
            f"available: {', '.join(sorted(METHODS))}, or a '+' combination such as hft+mofo"
        )
    check_combination(parts)
    return [(part, METHODS[part]) for part in parts]


def accepted_options(builder: Callable[..., MaskPlan]) -> set[str]:
    return set(list(inspect.signature(builder).parameters)[1:])


def plan_for(model: nn.Module, method: str, defaults: Mapping[str, Any] | None = None, **options) -> MaskPlan:
    """The plan of `method` for `model` (run on one rank; see dsforget.build_plan for many).

    `options` must each be accepted by at least one part of the method; `defaults` (the job's
    seed, MoFO fraction, ...) go only to the parts that accept them.
    """
    builders = _builders(method)
    accepted = set().union(*(accepted_options(builder) for _, builder in builders))
    unused = sorted(set(options) - accepted)
    if unused:
        known = ", ".join(sorted(accepted)) or "none"
        raise PlanError(f"method {method!r} has no option {unused[0]!r}; its options: {known}")
    plans = []
    for _, builder in builders:
        own = accepted_options(builder)
        values = {k: v for k, v in (defaults or {}).items() if k in own}
        values.update({k: v for k, v in options.items() if k in own})
        plans.append(builder(model, **values))
    return plans[0] if len(plans) == 1 else compose(plans)


__all__ = ["METHODS", "accepted_options", "compose", "plan_for"]
