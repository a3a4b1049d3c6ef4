"""Layer freezing: train what the options name, freeze everything else (LLaMA-Factory's
``finetuning_type: freeze``, the peers' usual answer to forgetting).

The options follow LLaMA-Factory's ``freeze_trainable_layers`` / ``freeze_trainable_modules`` /
``freeze_extra_modules``, plus regexes:

- ``trainable_layers``: n > 0 trains the last n numbered layers, n < 0 the first |n|, 0 none; or a
  list of layer indices. Default 2 (LLaMA-Factory's), or 0 when ``trainable_patterns`` is given.
- ``trainable_modules``: inside those layers, ``"all"`` (default) or module paths such as
  ``mlp``, ``self_attn`` or ``self_attn.q_proj`` (a list, or one comma-separated string).
- ``extra_modules``: modules outside the layers that also train, by name (``embed_tokens``,
  ``lm_head``, ``norm``) or full path (``model.norm``).
- ``trainable_patterns``: regexes; every parameter whose full name one of them finds
  (``re.search``) trains.

What trains is the union of the above. Unlike LLaMA-Factory, where a layer count beyond the
model is clamped, a selection that names nothing, or more layers than the model has, is an error
naming the option. Frozen parameters get ``requires_grad=False`` before DeepSpeed builds its
partitions: no gradient, master copy or Adam state.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from ..optim.params import full_numel, named_parameters_with_modules
from ..optim.plan import DENSE, FROZEN, MaskPlan, PlanError
from .architecture import layer_position
from .options import name_list

# LLaMA-Factory's default freeze_trainable_layers: the last two layers train.
DEFAULT_LAYERS = 2


def _names(key: str, value: str | Sequence[str] | None, split: bool = True) -> list[str]:
    return name_list("freeze", key, value, split)


def _layers(value: int | Sequence[int], n_layers: int) -> list[int]:
    """The layer indices `trainable_layers` names in a model of `n_layers` numbered layers."""
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > n_layers:
            raise PlanError(
                f"freeze option trainable_layers={value} asks for {abs(value)} layers; the model has "
                f"{n_layers}"
            )
        return list(range(n_layers - value, n_layers)) if value > 0 else list(range(-value))
    if isinstance(value, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        outside = [i for i in value if not 0 <= i < n_layers]
        if outside:
            raise PlanError(
                f"freeze option trainable_layers={list(value)}: layer {outside[0]} is not in "
                f"0..{n_layers - 1}"
            )
        return sorted(set(value))
    raise PlanError(
        f"freeze option trainable_layers={value!r} must be an integer (last n layers, or first |n| "
        "when negative) or a list of layer indices"
    )


def _within(path: str, module: str) -> bool:
    """Whether the module at `path` (inside a layer) is `module` or inside it."""
    return path == module or path.startswith(module + ".")


def _named(path: str, module: str) -> bool:
    """Whether `module` names the module at `path`: its full path or its own (last) name."""
    return path == module or path.rpartition(".")[2] == module


def freeze_plan(
    model: nn.Module,
    trainable_layers: int | list[int] | None = None,
    trainable_modules: str | list[str] = "all",
    extra_modules: str | list[str] | None = None,
    trainable_patterns: str | list[str] | None = None,
) -> MaskPlan:
    """Dense rules for what the options name, frozen rules for everything else."""
    numels = {name: full_numel(param) for name, param, _ in named_parameters_with_modules(model)}
    names = list(numels)
    positions = {name: layer_position(name) for name in names}
    in_layers = {name: position for name, position in positions.items() if position is not None}
    outside = [name for name, position in positions.items() if position is None]
    n_layers = 1 + max((layer for layer, _ in in_layers.values()), default=-1)
    patterns = _names("trainable_patterns", trainable_patterns, split=False)
    if trainable_layers is None:
        trainable_layers = 0 if patterns else DEFAULT_LAYERS
    if not n_layers and trainable_layers:
        raise PlanError(
            f"freeze option trainable_layers={trainable_layers!r}: {type(model).__name__} has no numbered "
            "layers ('layers.N.' or 'h.N.'); name what trains with trainable_patterns"
        )
    layers = set(_layers(trainable_layers, n_layers))
    modules = _names("trainable_modules", trainable_modules)
    trained: set[str] = set()
    layer_modules = sorted({path.split(".")[0] for _, path in in_layers.values()})
    for module in modules:
        if module != "all" and not any(_within(path, module) for _, path in in_layers.values()):
            raise PlanError(
                f"freeze option trainable_modules: no module {module!r} in the layers; choose from all, "
                f"{', '.join(layer_modules) or '(no numbered layers)'}, or a path inside one of them"
            )
        trained.update(
            name
            for name, (layer, path) in in_layers.items()
            if layer in layers and (module == "all" or _within(path, module))
        )
    module_paths = {name: name.rpartition(".")[0] for name in outside}
    for extra in _names("extra_modules", extra_modules):
        found = [name for name, path in module_paths.items() if path and _named(path, extra)]
        if not found:
            known = sorted({path.rpartition(".")[2] for path in module_paths.values() if path})
            raise PlanError(
                f"freeze option extra_modules: no module {extra!r} outside the layers; choose from "
                f"{', '.join(known) or 'none'}"
            )
        trained.update(found)
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as error:
            raise PlanError(
                f"freeze option trainable_patterns: {pattern!r} is not a regex ({error})"
            ) from None
        found = [name for name in names if regex.search(name)]
        if not found:
            raise PlanError(f"freeze option trainable_patterns: {pattern!r} matches no parameter name")
        trained.update(found)
    if not trained:
        raise PlanError(
            "freeze: these options train no parameter (trainable_layers=0 and nothing else named); "
            "name layers, extra_modules or trainable_patterns"
        )
    options = {
        "trainable_layers": trainable_layers,
        "trainable_modules": modules,
        "extra_modules": _names("extra_modules", extra_modules),
        "trainable_patterns": patterns,
    }
    rules = {name: DENSE if name in trained else FROZEN for name in names}
    meta = {
        **options,
        "layers_trained": sorted(layers),
        "share_of_all_parameters": round(sum(numels[n] for n in trained) / max(sum(numels.values()), 1), 6),
    }
    return MaskPlan(rules=rules, method="freeze", meta=meta)
