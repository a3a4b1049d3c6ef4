"""MoFOAdamW: the drop-in MoFO optimizer, and MoFO's rule when only parameter names are known.

The name-based rule lives here, below dsforget.methods, so the drop-in optimizer needs no method
module; dsforget.methods.mofo builds on it (and also recognises norms by module class).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .optimizer import ForgetAdamW, ParamsArg, named_groups
from .params import is_bias_or_norm_name
from .plan import DENSE, MaskPlan, ParamRule

# MoFO's default share of entries updated per block (the paper's and the reference code's 15%).
DEFAULT_FRACTION = 0.15


def plan_from_exemptions(exempt: Mapping[str, bool], fraction: float) -> MaskPlan:
    """Top-k for every parameter, a dense update for the exempt ones (biases and norms)."""
    filtered = ParamRule("topk", fraction=fraction)
    rules = {name: DENSE if is_exempt else filtered for name, is_exempt in exempt.items()}
    return MaskPlan(rules=rules, method="mofo", meta={"fraction": fraction})


def mofo_plan_from_names(names: Iterable[str], fraction: float) -> MaskPlan:
    """MoFO's rule when only names are known (the optimizer was given (name, tensor) pairs)."""
    return plan_from_exemptions({name: is_bias_or_norm_name(name) for name in names}, fraction)


class MoFOAdamW(ForgetAdamW):
    """Drop-in MoFO: AdamW whose update touches only the top `fraction` of |m| per parameter.

    Pass ``model.named_parameters()`` so biases and norms get dense updates as in the MoFO
    reference code; unnamed tensors are all filtered. For norms recognised by module class as
    well, use ``ForgetAdamW(..., plan=dsforget.plan_for(model, "mofo"))``.
    """

    def __init__(
        self,
        params: ParamsArg,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fraction: float = DEFAULT_FRACTION,
        topk: str = "exact",
        decay_scope: str = "all",
        backend: str = "auto",
        one_pass: bool = True,
        multi_tensor: bool = True,
    ) -> None:
        groups, names = named_groups(params)
        groups_with_names = [{**g, "params": [(names[id(t)], t) for t in g["params"]]} for g in groups]
        self.fraction = fraction
        plan = mofo_plan_from_names(names.values(), fraction)
        super().__init__(
            groups_with_names,
            plan,
            lr,
            betas,
            eps,
            weight_decay,
            topk,
            decay_scope,
            backend,
            one_pass,
            multi_tensor,
        )

    def _plan_for_names(self, plan: MaskPlan) -> MaskPlan:
        return mofo_plan_from_names(self._names.values(), self.fraction)
