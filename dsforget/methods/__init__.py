"""Methods turn a model into a MaskPlan. Every method is a function (model, **options) -> plan."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..plan import MaskPlan, PlanError
from .full import full_plan
from .mofo import mofo_plan

METHODS: dict[str, Callable[..., MaskPlan]] = {"full": full_plan, "mofo": mofo_plan}


def plan_for(model: nn.Module, method: str, **options) -> MaskPlan:
    """The plan of `method` for `model` (run on one rank; see dsforget.build_plan for many)."""
    try:
        builder = METHODS[method]
    except KeyError:
        raise PlanError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}") from None
    try:
        return builder(model, **options)
    except TypeError as err:
        raise PlanError(f"method {method!r}: {err}") from None


__all__ = ["METHODS", "plan_for"]
