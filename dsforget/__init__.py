"""dsforget: fine-tune LLMs inside DeepSpeed ZeRO while limiting forgetting (MoFO, HFT, CoFiTune).

Packages, from the bottom layer up (imports point downwards only):
- ``dsforget.kernels``: fused optimizer-step ops on flat shards, each beside its PyTorch reference;
- ``dsforget.optim``: the plan, shard layouts, ForgetAdamW / MoFOAdamW, partition discovery;
- ``dsforget.integration``: DeepSpeed (initialize, config rules), launcher rendezvous, one block
  gathered at a time under ZeRO-3, Hugging Face Trainer, export;
- ``dsforget.methods``: MoFO, HFT, CoFiTune, full fine-tuning and their combinations as plans,
  chosen on rank 0 and broadcast (coordinator);
- ``dsforget.eval``, ``dsforget.train``: forgetting measures and the report; the training job;
- ``dsforget.experiments``: CoFiTune's coarse search, continual stages, method comparison;
- ``dsforget.lab``: the embedded forgetting experiment.

Importing dsforget needs neither a GPU nor Triton nor an initialised DeepSpeed.
"""

from . import engine  # noqa: F401  the stable dsforget.engine.prepare_config, without its own import
from .integration.ds_config import load_deepspeed_config
from .integration.initialize import UnsupportedSetupError, initialize
from .methods import METHODS, plan_for
from .methods.coordinator import build_plan, verify_plan_agreement
from .optim import ForgetAdamW, MaskPlan, MoFOAdamW, ParamRule, PlanError
from .optim.comm import close_process_group

__all__ = [
    "METHODS",
    "ForgetAdamW",
    "MaskPlan",
    "MoFOAdamW",
    "ParamRule",
    "PlanError",
    "UnsupportedSetupError",
    "build_plan",
    "close_process_group",
    "initialize",
    "load_deepspeed_config",
    "plan_for",
    "verify_plan_agreement",
]
__version__ = "0.1.0"
