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

from .methods import plan_for
from .plan import MaskPlan, PlanError


def _distributed() -> bool:
    from deepspeed import comm

    return comm.is_initialized() and comm.get_world_size() > 1


def build_plan(
    model: nn.Module, method: str, defaults: Mapping[str, Any] | None = None, **options
) -> MaskPlan:
    """`plan_for` on global rank 0, broadcast to every rank (call it on all ranks)."""
    if not _distributed():
        return plan_for(model, method, defaults, **options)
    from deepspeed import comm

    message = [plan_for(model, method, defaults, **options).to_json() if comm.get_rank() == 0 else None]
    comm.broadcast_object_list(message, src=0)
    return MaskPlan.from_json(message[0], source="plan broadcast from rank 0")


def verify_plan_agreement(plan: MaskPlan) -> None:
    """Raise on every rank unless all ranks hold a plan with the same digest."""
    if not _distributed():
        return
    from deepspeed import comm

    digests: list[str | None] = [None] * comm.get_world_size()
    comm.all_gather_object(digests, plan.digest)
    differing = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
    if differing:
        raise PlanError(
            f"rank(s) {differing} hold a plan whose digest differs from rank 0's ({digests[0][:12]}); "
            "masks must be identical on every rank: build the plan with dsforget.build_plan, which "
            "chooses it on rank 0 and broadcasts it"
        )
