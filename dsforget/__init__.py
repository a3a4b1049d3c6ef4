"""dsforget: fine-tune LLMs inside DeepSpeed ZeRO while limiting forgetting (MoFO, HFT, CoFiTune).

Importing dsforget needs neither a GPU nor Triton nor an initialised DeepSpeed.
"""

from .coordinator import build_plan, verify_plan_agreement
from .engine import UnsupportedSetupError, initialize, load_deepspeed_config
from .methods import METHODS, plan_for
from .optimizer import ForgetAdamW, MoFOAdamW
from .plan import MaskPlan, ParamRule, PlanError

__all__ = [
    "METHODS",
    "ForgetAdamW",
    "MaskPlan",
    "MoFOAdamW",
    "ParamRule",
    "PlanError",
    "UnsupportedSetupError",
    "build_plan",
    "initialize",
    "load_deepspeed_config",
    "plan_for",
    "verify_plan_agreement",
]
__version__ = "0.1.0"
