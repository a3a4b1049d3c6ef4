"""dsforget.initialize: deepspeed.initialize, then bind ForgetAdamW to DeepSpeed's partitions.

Nothing in DeepSpeed is patched. After the engine exists, the layout of every flat fp32
partition is read from DeepSpeed's own bookkeeping: the public ``param._hp_mapping`` fragments
(``deepspeed.utils.tensor_fragment``) for ZeRO-1/2 and the bf16 optimizer, and the stage-3
optimizer's ``grad_position`` / ``fp16_groups`` / ``fp32_partitioned_groups_flat`` for ZeRO-3.
Every private attribute read is checked, so an unsupported DeepSpeed version fails clearly.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .coordinator import verify_plan_agreement
from .distributed import release_shared_memory_names
from .layout import Segment, ShardLayout
from .optimizer import ForgetAdamW
from .params import full_numel, full_shape, row_length

SUPPORTED_DEEPSPEED = ("0.17", "0.18", "0.19")


class UnsupportedSetupError(RuntimeError):
    """A DeepSpeed version or configuration dsforget cannot bind to."""


def load_deepspeed_config(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed JSON config as a dict, without its documentation keys (those starting with "_")."""
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"DeepSpeed config {path}: the top level must be a JSON object")
    return {key: value for key, value in config.items() if not key.startswith("_")}


def prepare_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the DeepSpeed config with the keys a client optimizer needs, checked.

    DeepSpeed refuses client optimizers under ZeRO unless ``zero_allow_untested_optimizer`` is
    true, and under optimizer offload unless ``zero_force_ds_cpu_optimizer`` is false; both are
    filled in when absent and rejected when the user set the opposite on purpose.
    """
    if isinstance(config, str | Path):
        config = load_deepspeed_config(config)
    config = copy.deepcopy(dict(config))
    if "optimizer" in config:
        raise ValueError(
            "the DeepSpeed config has an 'optimizer' section, but dsforget passes its own "
            "optimizer: remove the section"
        )
    if config.get("zero_allow_untested_optimizer") is False:
        raise ValueError(
            "zero_allow_untested_optimizer is false, but ForgetAdamW is a client optimizer: set it true"
        )
    config["zero_allow_untested_optimizer"] = True
    zero = config.get("zero_optimization", {})
    if config.get("bf16", {}).get("enabled") and zero.get("stage", 0) == 0:
        # DeepSpeed 0.19 then wraps the optimizer in its FP16_UnfusedOptimizer, which keeps its own
        # fp32 copies and steps the optimizer once while it is built, before any layout exists.
        raise UnsupportedSetupError(
            "bf16 without ZeRO (zero_optimization.stage 0) is not supported: use ZeRO stage 1, 2 "
            "or 3 with bf16 (configs/zero2.json), or fp32 (--precision fp32) without ZeRO"
        )
    offload = zero.get("offload_optimizer") or {}
    if offload.get("device", "none") not in ("none", None):
        if offload.get("device") != "cpu":
            raise UnsupportedSetupError(
                f"zero_optimization.offload_optimizer.device={offload.get('device')!r}: "
                "only 'cpu' is supported"
            )
        if offload.get("ratio", 1.0) != 1.0:
            raise UnsupportedSetupError(
                "zero_optimization.offload_optimizer.ratio < 1 needs DeepSpeedCPUAdam"
            )
        if config.get("zero_force_ds_cpu_optimizer") is True:
            raise ValueError(
                "zero_force_ds_cpu_optimizer is true, which replaces ForgetAdamW by DeepSpeedCPUAdam under "
                "offload: set it false"
            )
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def _require(obj: Any, *attributes: str) -> None:
    import deepspeed

    missing = [a for a in attributes if not hasattr(obj, a)]
    if missing:
        raise UnsupportedSetupError(
            f"{type(obj).__name__} from deepspeed {deepspeed.__version__} lacks {missing}; dsforget supports "
            f"deepspeed {', '.join(SUPPORTED_DEEPSPEED)}.x"
        )


def _fragment_layouts(optimizer: ForgetAdamW, params: dict[str, nn.Parameter]) -> list:
    """ZeRO-1/2 and the bf16 optimizer: group i is one flat slice; params carry _hp_mapping."""
    layouts = []
    for index, (group, names) in enumerate(
        zip(optimizer.param_groups, optimizer.group_param_names, strict=True)
    ):
        if len(group["params"]) != 1:
            raise UnsupportedSetupError(
                f"param group {index} holds {len(group['params'])} tensors, expected 1 flat"
            )
        flat = group["params"][0]
        segments = []
        for name in names:
            param = params[name]
            if not hasattr(param, "_hp_mapping"):
                raise UnsupportedSetupError(f"parameter {name} has no _hp_mapping after deepspeed.initialize")
            mapping = param._hp_mapping
            if mapping is None:  # no element of this parameter lives on this rank
                continue
            if mapping.param_group_index != index:
                raise UnsupportedSetupError(
                    f"parameter {name} is mapped to group {mapping.param_group_index}, not {index}"
                )
            segments.append(
                Segment(
                    name=name,
                    param_offset=mapping.lp_fragment_address.start,
                    shard_offset=mapping.hp_fragment_address.start,
                    length=mapping.lp_fragment_address.numel,
                    row_len=row_length(full_shape(param)),
                )
            )
        group_params = tuple((name, full_numel(params[name])) for name in names)
        layouts.append((flat, ShardLayout(flat.numel(), tuple(segments), group_params)))
    return layouts


def _zero3_layouts(wrapper: Any, names: dict[int, str]):
    """ZeRO-3: sub-group s is the concatenation of this rank's slice of each of its params."""
    from deepspeed import comm

    _require(
        wrapper,
        "fp16_groups",
        "fp32_partitioned_groups_flat",
        "grad_position",
        "get_param_id",
        "dp_process_group",
    )
    if getattr(wrapper, "swap_optimizer", False):
        raise UnsupportedSetupError(
            "NVMe optimizer swapping is not supported; offload the optimizer to 'cpu'"
        )
    layouts = []
    for sub_group, (params, flat) in enumerate(
        zip(wrapper.fp16_groups, wrapper.fp32_partitioned_groups_flat, strict=True)
    ):
        segments = []
        for param in params:
            group_index, shard_offset, partition_numel = wrapper.grad_position[wrapper.get_param_id(param)]
            if group_index != sub_group:
                raise UnsupportedSetupError(
                    f"grad_position places {names[id(param)]} in sub-group {group_index}"
                )
            # Each rank holds ceil(numel / world) elements; the last ranks' tails are padding.
            param_offset = comm.get_rank(group=param.ds_process_group) * partition_numel
            length = min(partition_numel, param.ds_numel - param_offset)
            if length > 0:
                segments.append(
                    Segment(
                        names[id(param)],
                        param_offset,
                        shard_offset,
                        length,
                        row_length(tuple(param.ds_shape)),
                    )
                )
        group_params = tuple((names[id(p)], p.ds_numel) for p in params)
        layouts.append((flat, ShardLayout(flat.numel(), tuple(segments), group_params)))
    return layouts, wrapper.dp_process_group


def discover_layouts(optimizer: ForgetAdamW) -> tuple[list, Any]:
    """Layouts found from the parameters alone, for an engine that plain ``deepspeed.initialize``
    built (Hugging Face Trainer, accelerate): ZeRO-3 parameters point to their optimizer
    (``_z3_optimizer``, what DeepSpeed's ``safe_get_local_*`` helpers use), ZeRO-1/2 parameters
    carry ``_hp_mapping`` fragments. The data-parallel group is DeepSpeed's global one."""
    from deepspeed.utils import groups

    params = optimizer.trained_parameters
    stage3 = next((p._z3_optimizer for p in params.values() if hasattr(p, "_z3_optimizer")), None)
    if stage3 is not None:
        return _zero3_layouts(stage3, {id(p): name for name, p in params.items()})
    if any(getattr(p, "_hp_mapping", None) is not None for p in params.values()):
        return _fragment_layouts(optimizer, params), groups._get_data_parallel_group()
    raise UnsupportedSetupError(
        "ForgetAdamW was handed a flat tensor, but its parameters carry no DeepSpeed partition "
        "mapping: build the engine with dsforget.initialize"
    )


def bind_to_engine(engine: Any, optimizer: ForgetAdamW) -> None:
    """Read the engine's partitions and hand their layouts to the optimizer."""
    params = dict(engine.module.named_parameters())
    wrapper = engine.optimizer
    if wrapper is optimizer:  # stage 0 in fp32: DeepSpeed steps the parameters themselves
        return
    if engine.zero_optimization_stage() == 3:
        layouts, group = _zero3_layouts(wrapper, {id(p): n for n, p in params.items()})
    elif hasattr(wrapper, "_link_all_hp_params") or type(wrapper).__name__ == "BF16_Optimizer":
        _require(wrapper, "real_dp_process_group")
        if len({id(g) for g in wrapper.real_dp_process_group}) != 1:
            raise UnsupportedSetupError("param groups reduce over different data-parallel groups (MoE)")
        layouts, group = _fragment_layouts(optimizer, params), wrapper.real_dp_process_group[0]
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
    return engine, ds_optimizer, dataloader, scheduler


__all__ = [
    "UnsupportedSetupError",
    "bind_to_engine",
    "discover_layouts",
    "initialize",
    "load_deepspeed_config",
    "prepare_config",
]
