"""Partition discovery: which slice of which parameter each flat tensor of DeepSpeed's holds.

Nothing in DeepSpeed is patched or copied. The layouts are read from DeepSpeed's own
bookkeeping: the public ``param._hp_mapping`` fragments (``deepspeed.utils.tensor_fragment``)
for ZeRO-1/2 and the bf16 optimizer, and the stage-3 optimizer's ``grad_position`` /
``fp16_groups`` / ``fp32_partitioned_groups_flat`` for ZeRO-3. Every private attribute read is
checked, so an unsupported DeepSpeed version fails clearly. The functions take param groups and
names, never the optimizer: the optimizer only ever receives the plain ShardLayouts they return.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .layout import Segment, ShardLayout
from .params import full_numel, full_shape, row_length

SUPPORTED_DEEPSPEED = ("0.17", "0.18", "0.19")

Layouts = list[tuple[torch.Tensor, ShardLayout]]


class UnsupportedSetupError(RuntimeError):
    """A DeepSpeed version or configuration dsforget cannot bind to."""


def require_attributes(obj: Any, *attributes: str) -> None:
    """UnsupportedSetupError naming what `obj` (a DeepSpeed object) lacks."""
    import deepspeed

    missing = [a for a in attributes if not hasattr(obj, a)]
    if missing:
        raise UnsupportedSetupError(
            f"{type(obj).__name__} from deepspeed {deepspeed.__version__} lacks {missing}; dsforget supports "
            f"deepspeed {', '.join(SUPPORTED_DEEPSPEED)}.x"
        )


def fragment_layouts(
    param_groups: Sequence[Mapping[str, Any]],
    group_param_names: Sequence[Sequence[str]],
    params: Mapping[str, torch.Tensor],
) -> Layouts:
    """ZeRO-1/2 and the bf16 optimizer: group i is one flat slice of the concatenation of its
    parameters (`group_param_names[i]`, in order); each parameter carries an ``_hp_mapping``
    saying which of its elements live in this rank's slice (None: none do)."""
    layouts = []
    for index, (group, names) in enumerate(zip(param_groups, group_param_names, strict=True)):
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


def zero3_layouts(stage3: Any, names: Mapping[int, str]) -> tuple[Layouts, Any]:
    """ZeRO-3: sub-group s is the concatenation of this rank's slice of each of its parameters.
    `stage3` is DeepSpeed's stage-3 optimizer, `names` maps id(parameter) to its name. Returns
    the layouts and the data-parallel group."""
    from deepspeed import comm

    require_attributes(
        stage3,
        "fp16_groups",
        "fp32_partitioned_groups_flat",
        "grad_position",
        "get_param_id",
        "dp_process_group",
    )
    if getattr(stage3, "swap_optimizer", False):
        raise UnsupportedSetupError(
            "NVMe optimizer swapping is not supported; offload the optimizer to 'cpu'"
        )
    layouts = []
    for sub_group, (params, flat) in enumerate(
        zip(stage3.fp16_groups, stage3.fp32_partitioned_groups_flat, strict=True)
    ):
        segments = []
        for param in params:
            group_index, shard_offset, partition_numel = stage3.grad_position[stage3.get_param_id(param)]
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
    return layouts, stage3.dp_process_group


def discover_layouts(
    param_groups: Sequence[Mapping[str, Any]],
    group_param_names: Sequence[Sequence[str]],
    params: Mapping[str, torch.Tensor],
) -> tuple[Layouts, Any]:
    """Layouts found from the parameters alone, for an engine that plain ``deepspeed.initialize``
    built (Hugging Face Trainer, accelerate): ZeRO-3 parameters point to their optimizer
    (``_z3_optimizer``, what DeepSpeed's ``safe_get_local_*`` helpers use), ZeRO-1/2 parameters
    carry ``_hp_mapping`` fragments. The data-parallel group is DeepSpeed's global one.
    `param_groups` are the optimizer's groups as DeepSpeed left them (one flat tensor each under
    ZeRO-1/2), `group_param_names` the names of each group's parameters in order, `params` the
    parameters by name."""
    from deepspeed.utils import groups

    stage3 = next((p._z3_optimizer for p in params.values() if hasattr(p, "_z3_optimizer")), None)
    if stage3 is not None:
        return zero3_layouts(stage3, {id(p): name for name, p in params.items()})
    if any(getattr(p, "_hp_mapping", None) is not None for p in params.values()):
        return fragment_layouts(param_groups, group_param_names, params), groups._get_data_parallel_group()
    raise UnsupportedSetupError(
        "ForgetAdamW was handed a flat tensor, but its parameters carry no DeepSpeed partition "
        "mapping: build the engine with dsforget.initialize"
    )
