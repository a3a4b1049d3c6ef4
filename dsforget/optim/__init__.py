"""The product's core: a MaskPlan says how each parameter trains, ForgetAdamW applies it to
whatever flat shard DeepSpeed hands it (ShardLayout), through dsforget.kernels."""

from .layout import Segment, ShardLayout
from .mofo_adamw import MoFOAdamW
from .optimizer import ForgetAdamW
from .plan import MaskPlan, ParamRule, PlanError

__all__ = ["ForgetAdamW", "MaskPlan", "MoFOAdamW", "ParamRule", "PlanError", "Segment", "ShardLayout"]
