"""L2-SP: full fine-tuning pulled back towards the pretrained weights (the regulariser MoFO's
paper compares against), decoupled like AdamW's weight decay.

Each step, before the Adam update, every trained entry moves a share lr·strength of its distance
back to its value at the first step: w ← w − lr·strength·(w − w0). The optimizer keeps w0 as
state of each shard it steps, so a rank holds w0 only for its own ZeRO partition of the fp32
master weights (4 bytes per trained parameter / ranks), and checkpoints carry it: a resumed run
pulls towards the pretrained weights, not the resumed ones. Strength 0 is full fine-tuning.
"""

from __future__ import annotations

import math

from torch import nn

from ..optim.params import named_parameters_with_modules
from ..optim.plan import MaskPlan, ParamRule, PlanError

# lr·strength is the share of the distance to w0 removed per step: at lr 1e-3, strength 1 halves
# an unopposed drift in ~700 steps.
DEFAULT_STRENGTH = 1.0


def l2_plan(model: nn.Module, strength: float = DEFAULT_STRENGTH) -> MaskPlan:
    """A dense update with a pull of `strength` on every parameter."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
        raise PlanError(f"l2 option strength={strength!r} must be a finite number >= 0")
    if strength < 0:
        raise PlanError(f"l2 option strength={strength!r} must be >= 0 (0 is full fine-tuning)")
    rule = ParamRule("dense", pull=float(strength))
    rules = {name: rule for name, _, _ in named_parameters_with_modules(model)}
    return MaskPlan(rules=rules, method="l2", meta={"strength": float(strength)})
