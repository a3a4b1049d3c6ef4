"""HFT (Hui et al. 2024, arXiv 2404.18466): train a random half of each layer's matrices, per category.

Per transformer layer, the rule of METHODS.md (Llama naming):
- attention {q, k, v, o}: 2 of 4 train, chosen at random per layer;
- feed-forward {gate, up, down}: 3 × 0.5 is not whole, so the layer indices are shuffled and the
  first ⌊L/2⌋ layers train 1 matrix, the others 2 — exactly half of all FFN matrices for even L;
- the two norms: 1 of 2 at random (``norms="half"``; or all ``"train"`` / ``"freeze"``);
- embeddings and LM head train (``embeddings``), the final norm trains (``final_norm``).
In general a category of c matrices trains fraction·c of them per layer, with the fractional
part spread over shuffled layers. GPT-2's fused QKV makes the attention category 2 matrices
(c_attn, c_proj): 1 of 2 trains. Phi-3's fused qkv_proj and gate_up_proj count as their row
blocks (q, k, v; gate, up), so its categories are Llama's: 2 of {q, k, v, o}, 1 or 2 of
{gate, up, down}; a fused parameter with some blocks chosen trains with the others' rows frozen
(it keeps a gradient and Adam state: only a fused parameter none of whose blocks train saves
memory). Gemma 2/3 and OLMo 2 have more norms per layer (up to six): half of them train. Under
grouped-query attention k and v are smaller than q and
o, so 2 of 4 matrices is not half the attention parameters: ``balance="params"`` picks, per
layer, among the subsets whose parameter share is closest to the fraction.

Frozen matrices become ``frozen`` rules: dsforget.initialize sets requires_grad=False before
DeepSpeed builds its partitions, so they cost no gradient, master copy or optimizer state.
All randomness comes from ``seed`` on the coordinator; dsforget.build_plan broadcasts it.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

from torch import nn

from ..optim.plan import DENSE, FROZEN, MaskPlan, ParamRule, PlanError
from .architecture import Anatomy, Matrix, anatomy

SWITCHES = ("train", "freeze")
NORM_RULES = ("half", "train", "freeze")
BALANCES = ("count", "params")


def _choice(key: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise PlanError(f"hft option {key}={value!r} is not allowed; choose one of {', '.join(allowed)}")
    return value


def per_layer_counts(n_layers: int, count: int, fraction: float, rng: random.Random) -> list[int]:
    """How many of a category's `count` matrices train in each layer.

    fraction·count = base + part: every layer trains `base`, and in shuffled layer order the last
    L − ⌊L·(1 − part)⌋ layers train one more (for part 0.5: the first ⌊L/2⌋ train `base`).
    """
    exact = fraction * count
    base = math.floor(exact + 1e-9)
    part = exact - base
    with_base = math.floor(n_layers * (1 - part) + 1e-9)
    order = list(range(n_layers))
    rng.shuffle(order)
    counts = [base] * n_layers
    for layer in order[with_base:]:
        counts[layer] = min(base + 1, count)
    return counts


def _pick(
    matrices: Sequence[Matrix], count: int, fraction: float, balance: str, rng: random.Random
) -> list[Matrix]:
    if balance == "count" or len(matrices) <= 1:
        return rng.sample(list(matrices), count)
    # by parameters: subsets closest to the fraction; ties prefer the count rule's size
    total = sum(m.numel for m in matrices)
    subsets = [
        list(subset) for size in range(len(matrices) + 1) for subset in itertools.combinations(matrices, size)
    ]

    def distance(subset: list[Matrix]) -> tuple[float, int]:
        share = sum(m.numel for m in subset) / total
        return (round(abs(share - fraction), 9), abs(len(subset) - count))

    best = min(distance(s) for s in subsets)
    return rng.choice([s for s in subsets if distance(s) == best])


def hft_plan(
    model: nn.Module,
    trainable_fraction: float = 0.5,
    seed: int = 0,
    norms: str = "half",
    embeddings: str = "train",
    final_norm: str = "train",
    other: str = "train",
    balance: str = "count",
) -> MaskPlan:
    """HFT's frozen/trainable split of `model` (frozen rules for the untrained matrices)."""
    if not 0 < trainable_fraction <= 1:
        raise PlanError(f"hft option trainable_fraction={trainable_fraction!r} must be in (0, 1]")
    _choice("norms", norms, NORM_RULES)
    _choice("balance", balance, BALANCES)
    for key, value in (("embeddings", embeddings), ("final_norm", final_norm), ("other", other)):
        _choice(key, value, SWITCHES)
    body = anatomy(model)
    rng = random.Random(seed)
    chosen_matrices: list[Matrix] = []
    choices: dict[str, dict[str, list[str]]] = {str(i): {} for i in range(len(body.layers))}
    for category in ("attention", "ffn", "norm"):
        if category == "norm" and norms != "half":
            if norms == "train":
                chosen_matrices += body.matrices("norm")
            continue
        per_layer = [[m for m in layer if m.category == category] for layer in body.layers]
        counts = per_layer_counts(len(per_layer), len(per_layer[0]), trainable_fraction, rng)
        for index, (matrices, count) in enumerate(zip(per_layer, counts, strict=True)):
            if not matrices:
                continue
            chosen = _pick(matrices, min(count, len(matrices)), trainable_fraction, balance, rng)
            choices[str(index)][category] = sorted(m.module for m in chosen)
            chosen_matrices += chosen
    rules: dict[str, ParamRule] = {name: FROZEN for name in body.shapes}
    for name, frozen_rows in body.frozen_rows(chosen_matrices).items():
        rules[name] = DENSE if frozen_rows is None else ParamRule("dense", frozen_rows=frozen_rows)
    switched = {"embeddings": (embeddings, body.embeddings), "final_norm": (final_norm, body.final_norms)}
    switched["other"] = (other, body.other)
    for setting, names in switched.values():
        if setting == "train":
            rules.update(dict.fromkeys(names, DENSE))
    options = {
        "trainable_fraction": trainable_fraction,
        "seed": seed,
        "norms": norms,
        "embeddings": embeddings,
        "final_norm": final_norm,
        "other": other,
        "balance": balance,
    }
    return MaskPlan(rules=rules, method="hft", meta=_meta(body, rules, options, choices))


def _meta(body: Anatomy, rules: dict[str, ParamRule], options: dict, choices: dict) -> dict:
    layer_params = {n for layer in body.layers for m in layer for n in m.params}
    plan = MaskPlan(rules)  # its trainable_share counts the trained rows of fused matrices
    return {
        **options,
        "family": body.family.name,
        "trained_per_layer": choices,
        "share_of_all_parameters": round(plan.trainable_share(body.shapes.items()), 6),
        "share_of_layer_parameters": round(
            plan.trainable_share((n, shape) for n, shape in body.shapes.items() if n in layer_params), 6
        ),
    }
