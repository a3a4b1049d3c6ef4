"""Full fine-tuning: a dense AdamW update everywhere (the baseline every method is compared to)."""

from __future__ import annotations

from torch import nn

from ..optim.params import named_parameters_with_modules
from ..optim.plan import DENSE, MaskPlan


def full_plan(model: nn.Module) -> MaskPlan:
    return MaskPlan(rules={name: DENSE for name, _, _ in named_parameters_with_modules(model)}, method="full")
