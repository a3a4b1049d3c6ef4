"""CoFiTune (Zhang et al. 2024, arXiv 2404.10306): chosen modules in chosen layers, importance-scaled.

Coarse: only the module set ``modules`` (``mha`` = q, k, v; ``ffn`` = up, down; ``both``) of the
layers in ``layers`` (CoFiTune's quarter and half ranges, see architecture.LAYER_RANGES) train;
everything else — other modules, embeddings, LM head, norms — is frozen before DeepSpeed builds
its partitions. The released result: ``layers="bottom2", modules="ffn"``.

Fine: with a unit-importance artifact (dsforget.methods.cofitune.importance), each trained matrix gets a row
scale 1 − importance of its output units — up_proj rows by FFN-neuron importance, down_proj
rows by hidden-dimension importance, q/k/v rows by head importance repeated head_dim times
(under grouped-query attention a k/v head takes the mean over the query heads that share it).
The optimizer applies it to each rank's own gradient shard: no collective per step.

Phi-3's fused modules: ``mha`` trains all of qkv_proj; ``ffn`` trains the up rows of gate_up_proj
(its gate rows are frozen rows of the rule, so they never move) and down_proj.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...optim.plan import FROZEN, MaskPlan, ParamRule, PlanError
from ..architecture import LAYER_RANGES, Anatomy, Matrix, anatomy, layer_range

if TYPE_CHECKING:
    from .importance import UnitImportance

MODULE_SETS = ("mha", "ffn", "both")
RELEASED = {"layers": "bottom2", "modules": "ffn"}


def trainable_modules(body: Anatomy, modules: str) -> tuple[str, ...]:
    if modules not in MODULE_SETS:
        raise PlanError(f"cofitune option modules={modules!r} is not allowed; choose one of {MODULE_SETS}")
    family = body.family
    return {
        "mha": family.cofitune_mha,
        "ffn": family.cofitune_ffn,
        "both": family.cofitune_mha + family.cofitune_ffn,
    }[modules]


def _load_importance(importance: str | Path | UnitImportance) -> UnitImportance:
    if isinstance(importance, str | Path):
        from .importance import UnitImportance

        return UnitImportance.load(importance)
    return importance


def row_scales(matrix: Matrix, importance: UnitImportance, body: Anatomy) -> torch.Tensor:
    """1 − importance of each output row (dim 0, nn.Linear's output unit) of one trained matrix."""
    layer = matrix.layer
    rows = _rows(matrix, body)
    if matrix.role == "up":
        unit = importance.intermediate[layer]
    elif matrix.role == "down":
        unit = importance.hidden[layer]
    elif matrix.role in ("q", "k", "v"):
        heads = importance.heads[layer]
        n_heads = heads.numel()
        q_rows = _rows(next(m for m in body.layers[layer] if m.role == "q"), body)
        if q_rows % n_heads:
            raise PlanError(f"importance has {n_heads} heads but q_proj has {q_rows} rows")
        head_dim = q_rows // n_heads
        if rows % head_dim:
            raise PlanError(
                f"{matrix.module} of layer {layer}: {rows} rows are not whole heads of {head_dim}"
            )
        n_kv = rows // head_dim
        if n_heads % n_kv:
            raise PlanError(f"{n_heads} query heads cannot share {n_kv} key/value heads")
        per_head = heads.reshape(n_kv, n_heads // n_kv).mean(dim=1)  # kv head i serves q heads i*g..
        unit = per_head.repeat_interleave(head_dim)
    else:
        raise PlanError(
            f"cofitune importance has no units for {matrix.module}; row scales exist for Llama-style "
            "q/k/v/up/down projections (GPT-2's Conv1D stores [in, out] and is not supported)"
        )
    if unit.numel() != rows:
        raise PlanError(
            f"importance for layer {layer} {matrix.module} has {unit.numel()} units, the matrix {rows} rows"
        )
    return 1.0 - unit.float()


def _rows(matrix: Matrix, body: Anatomy) -> int:
    """Output rows of a matrix (of its block, for a fused module's row block)."""
    if matrix.rows is not None:
        return matrix.rows[1] - matrix.rows[0]
    return body.shapes[matrix.params[0]][0]


def _check_importance(importance: UnitImportance, body: Anatomy) -> None:
    n_layers = len(body.layers)
    for unit in ("heads", "intermediate", "hidden"):
        tensor = getattr(importance, unit)
        if tensor.dim() != 2 or tensor.shape[0] != n_layers:
            raise PlanError(
                f"importance.{unit} has shape {tuple(tensor.shape)}; the model has {n_layers} layers "
                "(was the importance computed for another model?)"
            )


def cofitune_plan(
    model: nn.Module,
    layers: str = RELEASED["layers"],
    modules: str = RELEASED["modules"],
    importance: str | Path | UnitImportance | None = None,
) -> MaskPlan:
    """Coarse: train `modules` in the `layers` range only; fine: row scales from `importance`."""
    body = anatomy(model)
    chosen_layers = layer_range(layers, len(body.layers))
    paths = trainable_modules(body, modules)
    trained = [m for i in chosen_layers for m in body.layers[i] if m.module in paths]
    scales: dict[str, torch.Tensor] = {}
    if importance is not None:
        importance = _load_importance(importance)
        _check_importance(importance, body)
        for matrix in trained:  # a fused parameter's rows outside the trained blocks are frozen: 1 there
            start, stop = matrix.rows or (0, _rows(matrix, body))
            for name in matrix.params:
                full = scales.setdefault(name, torch.ones(body.shapes[name][0]))
                full[start:stop] = row_scales(matrix, importance, body)
    rules: dict[str, ParamRule] = {name: FROZEN for name in body.shapes}
    for name, frozen_rows in body.frozen_rows(trained).items():
        row_scale = tuple(scales[name].tolist()) if name in scales else None
        rules[name] = ParamRule("dense", row_scale=row_scale, frozen_rows=frozen_rows)
    meta = {
        "layers": layers,
        "layer_indices": [chosen_layers.start, chosen_layers.stop],
        "modules": modules,
        "trained_modules": list(paths),
        "importance": None if importance is None else dict(importance.meta),
        "family": body.family.name,
    }
    return MaskPlan(rules=rules, method="cofitune", meta=meta)


__all__ = ["LAYER_RANGES", "MODULE_SETS", "RELEASED", "cofitune_plan", "row_scales"]
