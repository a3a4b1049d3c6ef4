"""Fused op 3: the masked, bias-corrected, decoupled-weight-decay AdamW update.

Per element of every segment:
    selected = block == DENSE  or  bits(|m|) >= threshold[block]
    p *= 1 - lr*wd                     (all entries; only selected ones if decay_selected_only)
    p -= selected * lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
The formula and its order follow torch.optim.AdamW so fraction 1 reproduces it.
"""

from __future__ import annotations

import math

import torch

from .radix import abs_bits
from .segments import DENSE, SegmentTable


def masked_adamw_reference(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    thresholds: torch.Tensor,
    *,
    lr: float,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
    weight_decay: float,
    decay_selected_only: bool,
) -> None:
    step_size = lr / bias_correction1
    bias_correction2_sqrt = math.sqrt(bias_correction2)
    decay = 1 - lr * weight_decay
    threshold_list = thresholds.tolist()
    for shard_offset, length, _, _, block, _ in table.rows():
        span = slice(shard_offset, shard_offset + length)
        p, m, v = param[span], exp_avg[span], exp_avg_sq[span]
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        if block == DENSE:
            p.mul_(decay)
            p.addcdiv_(m, denom, value=-step_size)
            continue
        selected = abs_bits(m) >= threshold_list[block]
        if decay_selected_only:
            p.mul_(torch.where(selected, decay, 1.0))
        else:
            p.mul_(decay)
        p.addcdiv_(torch.where(selected, m, 0.0), denom, value=-step_size)


def masked_adamw(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    thresholds: torch.Tensor,
    *,
    lr: float,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
    weight_decay: float,
    decay_selected_only: bool,
    backend: str = "torch",
) -> None:
    if backend != "torch":
        raise ValueError(f"masked_adamw: backend {backend!r} is not available")
    masked_adamw_reference(
        param,
        exp_avg,
        exp_avg_sq,
        table,
        thresholds,
        lr=lr,
        bias_correction1=bias_correction1,
        bias_correction2=bias_correction2,
        eps=eps,
        weight_decay=weight_decay,
        decay_selected_only=decay_selected_only,
    )
