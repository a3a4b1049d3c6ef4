"""LoRA through peft: low-rank adapters beside frozen base weights (the baseline MoFO's paper
compares against; Hu et al. 2021).

Unlike the other methods, LoRA changes the model: every rank adds the adapters (``add_adapters``:
peft's ``inject_adapter_in_model``, the model keeps its class and names) after loading and before
DeepSpeed builds its partitions, so that under ZeRO-3 DeepSpeed partitions the adapters like any
parameter. The plan then trains the adapters and freezes the rest: the base weights cost no
gradient, master copy or Adam state. A target module ``q_proj`` becomes ``q_proj.base_layer``
(the frozen weight) plus ``q_proj.lora_A.default`` and ``q_proj.lora_B.default``; the export
(``dsforget.integration.export``) merges W + (alpha/rank)·B·A back under the base model's names.

Options: ``rank`` (r, default 8), ``alpha`` (default 16: scale alpha/rank = 2), ``dropout`` on the
adapters' input (default 0), ``target_modules`` (``all-linear``, the default: every linear layer
but the output layer; or module names such as ``q_proj,v_proj``, each matched as peft does: the
module's full path or its last components).

Meaningful combinations: ``lora`` (AdamW on the adapters) and ``lora+mofo`` (MoFO's momentum
filter on each adapter matrix: an experiment, no paper reports it). The others are refused:
HFT, CoFiTune and freeze choose which base weights train, and LoRA trains none of them; l2 pulls
trained weights towards their initial values, which for the adapters is B towards 0 and A towards
its random draw (use --weight_decay for a decay of the adapters).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..optim.params import named_parameters_with_modules
from ..optim.plan import DENSE, FROZEN, MaskPlan, PlanError
from .options import name_list

DEFAULT_RANK = 8
DEFAULT_ALPHA = 16.0  # LLaMA-Factory's default, 2 x rank
ALL_LINEAR = "all-linear"  # peft's shorthand: every nn.Linear but the output layer
ADAPTER = "default"  # peft's adapter name; the exported adapter files drop it
COMBINES_WITH = ("mofo",)


def check_combination(parts: Sequence[str]) -> None:
    """Refuse LoRA combined with a method that has nothing to act on (see the module docstring)."""
    if "lora" not in parts:
        return
    others = [part for part in parts if part != "lora" and part not in COMBINES_WITH]
    if others:
        raise PlanError(
            f"method {'+'.join(parts)!r}: lora combines only with {', '.join(COMBINES_WITH)} (lora+mofo: "
            f"MoFO's filter on the adapters); {others[0]} chooses or pulls base weights, which lora keeps "
            "frozen"
        )


def _target_modules(value: str | Sequence[str]) -> str | list[str]:
    if isinstance(value, str) and value.strip() == ALL_LINEAR:
        return ALL_LINEAR
    names = name_list("lora", "target_modules", value)
    if not names:
        raise PlanError("lora option target_modules=None must be 'all-linear' or module names")
    return names


def lora_config(
    rank: int = DEFAULT_RANK,
    alpha: float = DEFAULT_ALPHA,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = ALL_LINEAR,
):
    """peft's LoraConfig of the options, each checked here (one line naming the option; peft's
    own errors span lines or come only once the layers are built)."""
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise PlanError(f"lora option rank={rank!r} must be an integer >= 1")
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not (math.isfinite(alpha) and alpha > 0)
    ):
        raise PlanError(f"lora option alpha={alpha!r} must be a finite number > 0")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise PlanError(f"lora option dropout={dropout!r} must be a number in [0, 1)")
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=float(dropout), target_modules=_target_modules(target_modules)
    )


def _check_targets(model: nn.Module, targets: str | list[str]) -> None:
    """Every named target names a module (peft errors only when none does)."""
    if targets == ALL_LINEAR:
        return
    paths = [path for path, _ in model.named_modules() if path]
    for target in targets:
        if not any(path == target or path.endswith("." + target) for path in paths):
            linear = sorted(
                {path.rpartition(".")[2] for path, m in model.named_modules() if isinstance(m, nn.Linear)}
            )
            raise PlanError(
                f"lora option target_modules: no module {target!r} in {type(model).__name__}; linear "
                f"modules: {', '.join(linear) or 'none'}, or {ALL_LINEAR}"
            )


def add_adapters(model: nn.Module, options: Mapping[str, Any], seed: int) -> None:
    """Add the LoRA adapters the options describe to `model`, in place, on every rank.

    The adapters' random initialisation (A: Kaiming-uniform, B: zeros) is drawn from `seed` alone,
    so it does not depend on how much randomness loading consumed (ZeRO-3's construction draws
    differently) nor on the number of ranks."""
    own = inspect.signature(lora_config).parameters
    config = lora_config(**{key: value for key, value in options.items() if key in own})
    _check_targets(model, config.target_modules)
    from peft import inject_adapter_in_model

    config.base_model_name_or_path = getattr(model, "name_or_path", None)  # adapter_config.json's base
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def adapter_names(model: nn.Module) -> list[str]:
    """The adapter parameters peft added (``...lora_A.default.weight``, ``...lora_B.default.weight``)."""
    from peft.tuners.lora import LoraLayer

    layers = [path for path, module in model.named_modules() if isinstance(module, LoraLayer)]
    names = [name for name, _, _ in named_parameters_with_modules(model)]
    return [
        name
        for name in names
        for path in layers
        if name.startswith(path + ".") and not name.startswith(path + ".base_layer.")
    ]


def lora_plan(
    model: nn.Module,
    rank: int = DEFAULT_RANK,
    alpha: float = DEFAULT_ALPHA,
    dropout: float = 0.0,
    target_modules: str | list[str] = ALL_LINEAR,
) -> MaskPlan:
    """Dense rules for the adapters, frozen rules for every base weight. `model` must carry the
    adapters ``add_adapters`` made with the same options."""
    wanted = lora_config(rank, alpha, dropout, target_modules)
    have = getattr(model, "peft_config", {}).get(ADAPTER)
    if have is None or (have.r, have.lora_alpha, have.lora_dropout) != (
        wanted.r,
        wanted.lora_alpha,
        wanted.lora_dropout,
    ):
        raise PlanError(
            f"lora: {type(model).__name__} carries no adapter of rank {rank}, alpha {alpha}, dropout "
            f"{dropout}; add it first with dsforget.methods.lora.add_adapters (the job does)"
        )
    trained = set(adapter_names(model))
    names = [name for name, _, _ in named_parameters_with_modules(model)]
    rules = {name: DENSE if name in trained else FROZEN for name in names}
    adapted = sorted({name.partition(".lora_")[0] for name in trained})
    meta = {
        "rank": rank,
        "alpha": float(alpha),
        "scale": float(alpha) / rank,
        "dropout": float(dropout),
        "target_modules": wanted.target_modules
        if isinstance(wanted.target_modules, str)
        else sorted(wanted.target_modules),
        "adapted_modules": len(adapted),
    }
    return MaskPlan(rules=rules, method="lora", meta=meta)
