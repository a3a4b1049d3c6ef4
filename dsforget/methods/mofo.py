"""MoFO (Chen et al. 2024, arXiv 2407.20999): update only the entries with the largest momentum.

As in the reference code, biases and norms get a plain dense update and everything else,
embeddings and LM head included, is filtered with one block per parameter tensor. Norms are
recognised by module class as well as by name, so RMSNorm weights of any model family count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from ..params import is_bias_or_norm_name, is_norm_module, named_parameters_with_modules
from ..plan import DENSE, MaskPlan, ParamRule

DEFAULT_FRACTION = 0.15


def plan_from_exemptions(exempt: Mapping[str, bool], fraction: float) -> MaskPlan:
    """Top-k for every parameter, a dense update for the exempt ones (biases and norms)."""
    filtered = ParamRule("topk", fraction=fraction)
    rules = {name: DENSE if is_exempt else filtered for name, is_exempt in exempt.items()}
    return MaskPlan(rules=rules, method="mofo", meta={"fraction": fraction})


def mofo_plan(
    model: nn.Module, fraction: float = DEFAULT_FRACTION, filter_biases_and_norms: bool = False
) -> MaskPlan:
    exempt = {
        name: not filter_biases_and_norms and (is_bias_or_norm_name(name) or is_norm_module(module))
        for name, _, module in named_parameters_with_modules(model)
    }
    return plan_from_exemptions(exempt, fraction)


def mofo_plan_from_names(names: Iterable[str], fraction: float) -> MaskPlan:
    """MoFO's rule when only names are known (the optimizer was given (name, tensor) pairs)."""
    return plan_from_exemptions({name: is_bias_or_norm_name(name) for name in names}, fraction)
