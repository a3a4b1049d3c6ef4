"""dsforget.initialize: deepspeed.initialize, then bind ForgetAdamW to DeepSpeed's partitions.

Nothing in DeepSpeed is patched. The layouts of the engine's flat fp32 partitions are read by
dsforget.optim.partitions; this module checks the setup before the engine is built and hands
the optimizer its layouts after.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..optim.comm import (
    close_process_group_at_exit,
    release_shared_memory_names,
    verify_plan_agreement,
)
from ..optim.optimizer import ForgetAdamW
from ..optim.params import full_shape
from ..optim.partitions import (
    SUPPORTED_DEEPSPEED,
    UnsupportedSetupError,
    fragment_layouts,
    require_attributes,
    zero3_layouts,
)
from .ds_config import load_deepspeed_config, prepare_config


def bind_to_engine(engine: Any, optimizer: ForgetAdamW) -> None:
    """Read the engine's partitions and hand their layouts to the optimizer."""
    params = dict(engine.module.named_parameters())
    wrapper = engine.optimizer
    if wrapper is optimizer:  # stage 0 in fp32: DeepSpeed steps the parameters themselves
        return
    if engine.zero_optimization_stage() == 3:
        layouts, group = zero3_layouts(wrapper, {id(p): n for n, p in params.items()})
    elif hasattr(wrapper, "_link_all_hp_params") or type(wrapper).__name__ == "BF16_Optimizer":
        require_attributes(wrapper, "real_dp_process_group")
        if len({id(g) for g in wrapper.real_dp_process_group}) != 1:
            raise UnsupportedSetupError("param groups reduce over different data-parallel groups (MoE)")
        layouts = fragment_layouts(optimizer.param_groups, optimizer.group_param_names, params)
        group = wrapper.real_dp_process_group[0]
    else:
        raise UnsupportedSetupError(
            f"DeepSpeed wrapped the optimizer in {type(wrapper).__name__} (fp16 without ZeRO?); "
            "use bf16 or fp32, "
            "or ZeRO stage 1, 2 or 3"
        )
    optimizer.bind(layouts, data_parallel_group=group)


def initialize(model: nn.Module, optimizer: ForgetAdamW, config: str | Path | Mapping[str, Any], **kwargs):
    """``deepspeed.initialize`` for a ForgetAdamW: same arguments, same four return values.

    Before the engine is built, checks that every rank holds the same plan and that the plan
    fits the model, and sets ``requires_grad=False`` on frozen parameters so they cost no
    gradient, fp32 master copy or optimizer state.
    """
    import deepspeed

    if not isinstance(optimizer, ForgetAdamW):
        raise TypeError(
            f"dsforget.initialize needs a ForgetAdamW (or MoFOAdamW), got {type(optimizer).__name__}"
        )
    if not deepspeed.__version__.startswith(SUPPORTED_DEEPSPEED):
        raise UnsupportedSetupError(
            f"deepspeed {deepspeed.__version__} is not supported; install one of {SUPPORTED_DEEPSPEED}.x"
        )
    config = prepare_config(config)
    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed()
    release_shared_memory_names()
    verify_plan_agreement(optimizer.membership_plan)
    named = list(model.named_parameters())
    optimizer.adopt_names(named)
    plan = optimizer.membership_plan  # what DeepSpeed partitions; an active plan may hold more
    plan.check_parameters(
        ((name, full_shape(p)) for name, p in named), required=[name for name, p in named if p.requires_grad]
    )
    for name, param in named:
        if name in plan.rules and not plan[name].trains:
            param.requires_grad_(False)
    engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, **kwargs
    )
    bind_to_engine(engine, optimizer)
    optimizer.prepare_kernels()  # stage 0 binds no layout; the kernels are built here all the same
    close_process_group_at_exit()
    return engine, ds_optimizer, dataloader, scheduler


__all__ = [
    "UnsupportedSetupError",
    "bind_to_engine",
    "initialize",
    "load_deepspeed_config",
    "prepare_config",
]
