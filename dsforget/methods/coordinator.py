"""The coordinator: global rank 0 chooses the plan, every rank receives it and proves it.

Methods with random choices (HFT) must not draw on every rank: one draw on rank 0, broadcast
over the job's process group, then a digest check so that a rank with another plan (built
locally, loaded from another file) fails before the first step instead of training silently
on different masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..optim.comm import is_distributed, verify_plan_agreement
from ..optim.plan import MaskPlan, PlanError
from . import plan_for


def build_plan(
    model: nn.Module, method: str, defaults: Mapping[str, Any] | None = None, **options
) -> MaskPlan:
    """`plan_for` on global rank 0, broadcast to every rank (call it on all ranks)."""
    if not is_distributed():
        return plan_for(model, method, defaults, **options)
    from deepspeed import comm

    # Rank 0's error is sent too: every rank raises it, instead of the others waiting in the
    # broadcast for a plan that never comes.
    message: list[Any] = [None]
    if comm.get_rank() == 0:
        try:
            message = [plan_for(model, method, defaults, **options).to_json()]
        except PlanError as error:
            message = [error]
    comm.broadcast_object_list(message, src=0)
    if isinstance(message[0], PlanError):
        raise PlanError(str(message[0]))
    return MaskPlan.from_json(message[0], source="plan broadcast from rank 0")


__all__ = ["build_plan", "verify_plan_agreement"]
