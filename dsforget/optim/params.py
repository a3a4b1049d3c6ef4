"""Facts about model parameters that hold whether or not ZeRO-3 has partitioned them."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

# Names the MoFO reference code exempts from filtering ("bias", "norm", GPT-2's ln_f / ln_1 / ln_2).
_DENSE_NAME = re.compile(r"(bias|norm|(^|\.)ln_(f|\d+)\.)", re.IGNORECASE)


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The parameter's logical shape (ZeRO-3 replaces .shape by an empty placeholder)."""
    return tuple(getattr(param, "ds_shape", param.shape))


def full_numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))


def row_length(shape: tuple[int, ...]) -> int:
    """Entries per output row (dim 0) of a parameter stored row-major; 1 for vectors."""
    if len(shape) <= 1:
        return 1
    numel = 1
    for size in shape[1:]:
        numel *= size
    return numel


def is_norm_module(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the model-specific variants (LlamaRMSNorm, Qwen2RMSNorm, ...)."""
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or type(module).__name__.endswith("Norm")


def is_bias_or_norm_name(name: str) -> bool:
    return bool(_DENSE_NAME.search(name))


def named_parameters_with_modules(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, nn.Module]]:
    """(name, parameter, owning module) for every parameter, shared ones once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            yield (f"{module_name}.{local_name}" if module_name else local_name), param, module
