"""MoFO (Chen et al. 2024, arXiv 2407.20999): update only the entries with the largest momentum.

As in the reference code, biases and norms get a plain dense update and everything else,
embeddings and LM head included, is filtered with one block per parameter tensor. Norms are
recognised by module class as well as by name, so RMSNorm weights of any model family count.
"""

from __future__ import annotations

from torch import nn

from ..optim.mofo_adamw import DEFAULT_FRACTION, plan_from_exemptions
from ..optim.params import is_bias_or_norm_name, is_norm_module, named_parameters_with_modules
from ..optim.plan import MaskPlan


def mofo_plan(
    model: nn.Module, fraction: float = DEFAULT_FRACTION, filter_biases_and_norms: bool = False
) -> MaskPlan:
    exempt = {
        name: not filter_biases_and_norms and (is_bias_or_norm_name(name) or is_norm_module(module))
        for name, _, module in named_parameters_with_modules(model)
    }
    return plan_from_exemptions(exempt, fraction)
