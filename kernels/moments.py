"""Fused op 1: row-scale the gradient, update Adam's moments, and count |m| digits.

Per element of every segment (fp32 math, gradient fp32 or bf16):
    g = grad * rowscale[row]            (only for row-scaled segments)
    m = lerp(m, g, 1 - beta1)           (= beta1*m + (1-beta1)*g, as torch.optim.AdamW)
    v = beta2*v + (1-beta2)*g*g
and, when `histogram` is given, histogram[block, digit0(|m|)] += 1 for top-k segments,
which is the first radix-select level fused into the same pass over m.
"""

from __future__ import annotations

import torch

from .radix import abs_bits, digit_and_prefix, level_bins
from .segments import DENSE, NO_ROWSCALE, SegmentTable


def segment_rows(param_offset: int, length: int, row_len: int, device: torch.device) -> torch.Tensor:
    """Row index inside the parameter of each element of a segment."""
    return torch.arange(param_offset, param_offset + length, device=device) // row_len


def update_moments_reference(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    *,
    beta1: float,
    beta2: float,
    histogram: torch.Tensor | None = None,
) -> None:
    """Plain PyTorch, one segment at a time."""
    for shard_offset, length, param_offset, row_len, block, rowscale_start in table.rows():
        span = slice(shard_offset, shard_offset + length)
        g = grad[span].float()
        if rowscale_start != NO_ROWSCALE:
            rows = segment_rows(param_offset, length, row_len, grad.device)
            g = g * table.rowscale[rowscale_start + rows]
        m, v = exp_avg[span], exp_avg_sq[span]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if histogram is not None and block != DENSE:
            digit, _ = digit_and_prefix(abs_bits(m), 0)
            histogram[block] += torch.bincount(digit, minlength=level_bins(0))


def update_moments(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    *,
    beta1: float,
    beta2: float,
    histogram: torch.Tensor | None = None,
    backend: str = "torch",
) -> None:
    """Run the op with the named backend (see dsforget.kernels.backends)."""
    if backend != "torch":
        raise ValueError(f"update_moments: backend {backend!r} is not available")
    update_moments_reference(grad, exp_avg, exp_avg_sq, table, beta1=beta1, beta2=beta2, histogram=histogram)
