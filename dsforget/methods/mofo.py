"""MoFO (Chen et al. 2024, arXiv 2407.20999): update only the entries with the largest momentum.

As in the reference code, biases and norms get a plain dense update and everything else,
embeddings and LM head included, is filtered with one block per parameter tensor. Norms are
recognised by module class as well as by name, so RMSNorm weights of any model family count.
"""

from __future__ import annotations

from torch import nn

from ..params import is_bias_or_norm_name, is_norm_module, named_parameters_with_modules
from ..plan import DENSE, MaskPlan, ParamRule

DEFAULT_FRACTION = 0.15


def mofo_plan(
    model: nn.Module, fraction: float = DEFAULT_FRACTION, filter_biases_and_norms: bool = False
) -> MaskPlan:
    filtered = ParamRule("topk", fraction=fraction)
    rules = {}
    for name, _, module in named_parameters_with_modules(model):
        exempt = is_bias_or_norm_name(name) or is_norm_module(module)
        rules[name] = filtered if (filter_biases_and_norms or not exempt) else DENSE
    return MaskPlan(rules=rules, method="mofo", meta={"fraction": fraction})
