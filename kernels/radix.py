"""Exact top-k threshold by radix selection on the bit patterns of |m|.

A non-negative float32 read as int32 orders exactly like the float (IEEE 754), so the k-th
largest |m| of a block can be found digit by digit from histograms of those bits, without
sorting and without a full-size temporary. The sign bit of |m| is always 0, leaving 31 bits:
three levels of 11 + 10 + 10 bits, i.e. at most three histogram passes of 2048/1024/1024 bins
per block. Histograms are integer counts, so summing them over ranks (exact mode) gives the
same threshold at any world size.

State per block (int64 tensors [n_blocks], identical on every rank in exact mode):
  prefix     digits fixed so far (bits >> (shift + digit_bits) must equal it), -1 once resolved
  remaining  how many entries still to select among those matching `prefix`
  threshold  the selection threshold: entry selected iff bits(|m|) >= threshold
  matching   entries matching `prefix` (summed like the histograms); -1 before level 0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# (shift, digit_bits) of each level; digits cover bits 30..20, 19..10 and 9..0.
LEVELS: tuple[tuple[int, int], ...] = ((20, 11), (10, 10), (0, 10))
NUM_LEVELS = len(LEVELS)
RESOLVED = -1


def level_bins(level: int) -> int:
    return 1 << LEVELS[level][1]


def abs_bits(values: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |values| (float32), ordered like the floats."""
    return values.abs().view(torch.int32)


def digit_and_prefix(bits: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This level's digit of each bit pattern, and the higher bits it must match."""
    shift, width = LEVELS[level]
    return (bits >> shift) & ((1 << width) - 1), bits >> (shift + width)


@dataclass
class RadixState:
    prefix: torch.Tensor
    remaining: torch.Tensor
    threshold: torch.Tensor
    matching: torch.Tensor

    @staticmethod
    def start(block_k: torch.Tensor) -> RadixState:
        zeros = torch.zeros_like(block_k)
        return RadixState(
            prefix=zeros.clone(), remaining=block_k.clone(), threshold=zeros.clone(), matching=zeros - 1
        )

    @property
    def unresolved(self) -> torch.Tensor:
        return self.prefix != RESOLVED

    @property
    def done(self) -> bool:
        return bool((self.prefix == RESOLVED).all())


def refine(
    state: RadixState, histogram: torch.Tensor, level: int, blocks: torch.Tensor | None = None
) -> None:
    """Fix one more digit of every unresolved block (of `blocks`, a bool mask, if given) from its
    (already all-reduced) histogram.

    histogram: int64 [n_blocks, level_bins(level)], counts of this level's digit among the
    entries that match each block's prefix.
    """
    digit, in_bin, above = find_bin(histogram, state.remaining)
    enter_bin(state, level, (state.prefix << LEVELS[level][1]) | digit, in_bin, above, blocks)


def find_bin(histogram: torch.Tensor, remaining: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per row of `histogram` (int64 [n_blocks, bins], bins in increasing order of |m|), the bin
    that holds the `remaining`-th largest entry, its count, and the count of the bins above it."""
    # the bin is the largest d with (entries at or above d) >= remaining, i.e. with
    # (entries below d) <= total - remaining: a search in the cumulative counts (no flips)
    at_or_below = histogram.cumsum(1)
    total = at_or_below[:, -1]
    wanted = (total - remaining).unsqueeze(1)
    digit = torch.searchsorted(at_or_below, wanted, right=True).clamp_(max=histogram.shape[1] - 1)
    in_bin = histogram.gather(1, digit).squeeze(1)
    above = total - at_or_below.gather(1, digit).squeeze(1)
    return digit.squeeze(1), in_bin, above


def enter_bin(
    state: RadixState,
    level: int,
    new_prefix: torch.Tensor,
    in_bin: torch.Tensor,
    above: torch.Tensor,
    blocks: torch.Tensor | None = None,
) -> None:
    """Move every unresolved block (of `blocks`) into the bin `new_prefix` (bits >> shift of
    `level`), which holds `in_bin` of the entries that still count and has `above` of them in
    higher bins (all int64 [n_blocks]). A block resolves early when every entry of the bin is
    needed: then 'bits >= bin start' selects exactly `remaining`."""
    shift, _ = LEVELS[level]
    active = state.unresolved if blocks is None else state.unresolved & blocks
    needed = state.remaining - above
    resolves = active & ((needed == in_bin) | (level == NUM_LEVELS - 1))
    state.threshold = torch.where(resolves, new_prefix << shift, state.threshold)
    state.remaining = torch.where(active & ~resolves, needed, state.remaining)
    state.matching = torch.where(active & ~resolves, in_bin, state.matching)
    state.prefix = torch.where(resolves, RESOLVED, torch.where(active, new_prefix, state.prefix))
