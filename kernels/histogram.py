"""Fused op 2: one refinement level of the radix select, a histogram of |m| digits.

For every top-k segment whose block is still unresolved, counts the entries whose higher bits
equal the block's prefix, binned by this level's digit: histogram[block, digit] += 1.
Only m is read (4 bytes per element); nothing full-size is written.
"""

from __future__ import annotations

import torch

from .radix import RESOLVED, abs_bits, digit_and_prefix, level_bins
from .segments import DENSE, SegmentTable


def abs_histogram_reference(
    exp_avg: torch.Tensor, table: SegmentTable, prefix: torch.Tensor, level: int, histogram: torch.Tensor
) -> None:
    prefixes = prefix.tolist()
    for shard_offset, length, _, _, block, _ in table.rows():
        if block == DENSE or prefixes[block] == RESOLVED:
            continue
        digit, high = digit_and_prefix(abs_bits(exp_avg[shard_offset : shard_offset + length]), level)
        histogram[block] += torch.bincount(digit[high == prefixes[block]], minlength=level_bins(level))


def abs_histogram(
    exp_avg: torch.Tensor,
    table: SegmentTable,
    prefix: torch.Tensor,
    level: int,
    histogram: torch.Tensor,
    *,
    backend: str = "torch",
) -> None:
    """Accumulate into `histogram` (int64 [n_blocks, level_bins(level)])."""
    if backend != "torch":
        raise ValueError(f"abs_histogram: backend {backend!r} is not available")
    abs_histogram_reference(exp_avg, table, prefix, level, histogram)
