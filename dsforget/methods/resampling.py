"""HFT resampling inside one run: a new trainable half every N steps or epochs, moments kept.

HFT fixes its half for a whole stage; some users want to redraw it during a run. DeepSpeed cannot
change an engine's trainable set, so a resampling run gives the optimizer every matrix HFT could
choose (the *membership* plan: HFT at trainable_fraction 1) and switches the *active* plan between
steps (ForgetAdamW.set_active_plan): held matrices keep their Adam moments and do not move.

Cost, stated plainly: every member matrix then has a gradient, a reduction, an fp32 master copy
and Adam state, as in full fine-tuning — the memory and time saving of static HFT is gone; what
remains is HFT's regularisation (half the matrices move per interval).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..optim.plan import MaskPlan, PlanError
from .coordinator import build_plan

# Draw d uses seed + DRAW_SEED_STRIDE·d, far from the +1 per continual stage.
DRAW_SEED_STRIDE = 7919


@dataclass
class Resampler:
    """Builds the active plan of each draw (on rank 0, broadcast) and tells the optimizer."""

    model: nn.Module
    method: str
    defaults: Mapping[str, Any]
    options: Mapping[str, Any]
    every_steps: int
    current_draw: int | None = None

    def membership_plan(self) -> MaskPlan:
        if "hft" not in self.method.split("+"):
            raise PlanError(
                f"resample_every: only HFT draws what trains; method {self.method!r} has no 'hft' part"
            )
        wide = {**self.options, "trainable_fraction": 1.0}
        if wide.get("norms", "half") == "half":
            wide["norms"] = "train"
        return build_plan(self.model, self.method, self.defaults, **wide)

    def plan_of_draw(self, draw: int) -> MaskPlan:
        seed = int(self.options.get("seed", self.defaults.get("seed", 0))) + DRAW_SEED_STRIDE * draw
        return build_plan(
            self.model, self.method, {**self.defaults, "seed": seed}, **{**self.options, "seed": seed}
        )

    def before_step(self, step: int, optimizer: Any) -> MaskPlan | None:
        """Switch the optimizer to draw ⌊step / every_steps⌋ when it changes (also on resume)."""
        draw = step // self.every_steps
        if draw == self.current_draw:
            return None
        plan = self.plan_of_draw(draw)
        optimizer.set_active_plan(plan)
        self.current_draw = draw
        return plan
