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

A block with fewer nonzero |m| than k (e.g. embedding rows of tokens never seen, whose m is
exactly 0) has the threshold 0: its k-th largest |m| is a zero, and under the ties rule every
entry is selected. `resolve_at_zero` settles such blocks from the moments pass's nonzero counts
before any level: otherwise each level would count all the zeros into bin 0 and refine into it.
A block with at least k nonzero |m| has a threshold above 0; its zeros lie in bin 0 of level 0
and match no later prefix unless the threshold is below 2^-129 (level-1 prefix 0, a subnormal
threshold).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._cpu import cpu_ops
from ._triton import LAUNCH_OPTIONS, jit, tl

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
        # every move replaces the tensors (never writes into them), so they may be shared
        zeros = torch.zeros_like(block_k)
        return RadixState(
            prefix=zeros, remaining=block_k, threshold=zeros, matching=torch.full_like(zeros, -1)
        )

    @property
    def unresolved(self) -> torch.Tensor:
        return self.prefix != RESOLVED

    @property
    def done(self) -> bool:
        return bool((self.prefix == RESOLVED).all())


def resolve_at_zero(state: RadixState, nonzero: torch.Tensor) -> torch.Tensor:
    """Resolve with threshold 0 every unresolved block with fewer `nonzero` entries (int64
    [n_blocks], |m| != 0, summed over ranks like the histograms) than it still has to select;
    returns the mask of those blocks (bool [n_blocks]). Called before level 0, where `remaining`
    is k. Exact: the k-th largest |m| of such a block is 0, and bits >= 0 selects every entry,
    which is what the levels would find (bin 0 at every level, threshold 0 << shift)."""
    at_zero = state.unresolved & (nonzero < state.remaining)
    state.prefix = state.prefix.masked_fill(at_zero, RESOLVED)
    state.threshold = state.threshold.masked_fill(at_zero, 0)
    return at_zero


def refine(
    state: RadixState,
    histogram: torch.Tensor,
    level: int,
    blocks: torch.Tensor | None = None,
    backend: str = "torch",
) -> None:
    """Fix one more digit of every unresolved block (of `blocks`, a bool mask, if given) from its
    (already all-reduced) histogram.

    histogram: int64 [n_blocks, level_bins(level)], counts of this level's digit among the
    entries that match each block's prefix.
    """
    if backend == "cpu":  # base and skipped computed in C++: one op instead of three
        _advance_cpu(state, histogram, level, None, None, blocks, within_counts=False)
        return
    base = state.prefix << LEVELS[level][1]
    advance(state, histogram, level, base, torch.zeros_like(base), blocks, backend)


def advance(
    state: RadixState,
    histogram: torch.Tensor,
    level: int,
    base: torch.Tensor,
    skipped: torch.Tensor,
    blocks: torch.Tensor | None = None,
    backend: str = "torch",
) -> None:
    """Move every unresolved block (of `blocks`) into the bin that holds its `remaining`-th
    largest entry, from counts of consecutive `level` prefixes (bits >> shift of the level):
    histogram[b, j] counts prefix base[b] + j, and skipped[b] entries lie above all of them.
    `refine` appends a digit (base: prefix << digit bits, nothing skipped); a hint's window
    starts anywhere (`advance_within`). A block resolves early when every entry of its bin is
    needed: then 'bits >= bin start' selects exactly `remaining`.

    backend "cpu": one C++ call (~10 us) instead of ~25 small torch ops, which cost 5-10 us
    each right after a pass over the shard has evicted the interpreter's caches; "triton": one
    kernel launch (one program per block) instead of ~25.
    """
    if backend == "triton":
        state.prefix, state.remaining, state.threshold, state.matching = _advance_triton(
            state, histogram, level, base, skipped, blocks
        )
        return
    if backend == "cpu":
        _advance_cpu(state, histogram, level, base, skipped, blocks, within_counts=False)
        return
    # the bin is the largest j with (entries at or above j) >= wanted, i.e. with
    # (entries below j) <= total - wanted: a search in the cumulative counts (no flips)
    at_or_below = histogram.cumsum(1)
    total = at_or_below[:, -1:]
    wanted = (state.remaining - skipped).unsqueeze(1)
    digit = torch.searchsorted(at_or_below, total - wanted, right=True).clamp_(max=histogram.shape[1] - 1)
    in_bin = histogram.gather(1, digit).squeeze(1)
    above = skipped + (total - at_or_below.gather(1, digit)).squeeze(1)
    shift, _ = LEVELS[level]
    active = state.unresolved if blocks is None else state.unresolved & blocks
    needed = state.remaining - above
    new_prefix = base + digit.squeeze(1)
    resolves = active & ((needed == in_bin) | (level == NUM_LEVELS - 1))
    continues = active & ~resolves
    state.threshold = torch.where(resolves, new_prefix << shift, state.threshold)
    state.remaining = torch.where(continues, needed, state.remaining)
    state.matching = torch.where(continues, in_bin, state.matching)
    state.prefix = torch.where(resolves, RESOLVED, torch.where(active, new_prefix, state.prefix))


def advance_within(
    state: RadixState,
    histogram: torch.Tensor,
    level: int,
    base: torch.Tensor,
    skipped: torch.Tensor,
    backend: str = "torch",
) -> torch.Tensor:
    """`advance` for the unresolved blocks whose `remaining`-th largest entry lies among the
    counted ones (skipped < remaining <= skipped + counts); returns the mask of the blocks that
    moved (bool [n_blocks]; a hint's window: the blocks it hit)."""
    if backend == "cpu":
        return _advance_cpu(state, histogram, level, base, skipped, None, within_counts=True)
    moves = state.unresolved & (skipped < state.remaining) & (state.remaining <= skipped + histogram.sum(1))
    advance(state, histogram, level, base, skipped, blocks=moves, backend=backend)
    return moves


def _advance_cpu(
    state: RadixState,
    histogram: torch.Tensor,
    level: int,
    base: torch.Tensor | None,
    skipped: torch.Tensor | None,
    blocks: torch.Tensor | None,
    *,
    within_counts: bool,
) -> torch.Tensor:
    shift, digit_bits = LEVELS[level]
    state.prefix, state.remaining, state.threshold, state.matching, moved = cpu_ops().radix_advance(
        prefix=state.prefix,
        remaining=state.remaining,
        threshold=state.threshold,
        matching=state.matching,
        histogram=histogram,
        base=base,
        skipped=skipped,
        blocks=blocks,
        shift=shift,
        digit_bits=digit_bits,
        last_level=level == NUM_LEVELS - 1,
        within_counts=within_counts,
    )
    return moved


@jit
def _advance_kernel(
    prefix_ptr,  # [n_blocks] int64, RadixState before the move (read only)
    remaining_ptr,
    threshold_ptr,
    matching_ptr,
    histogram_ptr,  # [n_blocks, BINS] int64
    base_ptr,  # [n_blocks] int64
    skipped_ptr,  # [n_blocks] int64
    blocks_ptr,  # [n_blocks] int64, 0 or 1 (only read when MASKED)
    new_prefix_ptr,  # [n_blocks] int64, the state after the move
    new_remaining_ptr,
    new_threshold_ptr,
    new_matching_ptr,
    BINS: tl.constexpr,
    SHIFT: tl.constexpr,  # the level's shift: threshold = prefix << SHIFT
    LAST: tl.constexpr,  # the last level: every moved block resolves
    MASKED: tl.constexpr,
):
    block = tl.program_id(0)
    prefix = tl.load(prefix_ptr + block)
    remaining = tl.load(remaining_ptr + block)
    threshold = tl.load(threshold_ptr + block)
    matching = tl.load(matching_ptr + block)
    skipped = tl.load(skipped_ptr + block)
    active = prefix != -1
    if MASKED:
        active = active & (tl.load(blocks_ptr + block) != 0)
    bins = tl.arange(0, BINS)
    counts = tl.load(histogram_ptr + block * BINS + bins)
    at_or_above = tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts
    # the largest bin whose entries at or above reach `wanted` (bin 0 if none does)
    digit = tl.max(tl.where(at_or_above >= remaining - skipped, bins, 0), 0)
    in_bin = tl.sum(tl.where(bins == digit, counts, 0), 0)
    above = skipped + tl.sum(tl.where(bins > digit, counts, 0), 0)
    needed = remaining - above
    entered = tl.load(base_ptr + block) + digit
    if LAST:
        resolves = active
    else:
        resolves = active & (needed == in_bin)
    continues = active & (resolves == 0)
    tl.store(new_threshold_ptr + block, tl.where(resolves, entered << SHIFT, threshold))
    tl.store(new_remaining_ptr + block, tl.where(continues, needed, remaining))
    tl.store(new_matching_ptr + block, tl.where(continues, in_bin, matching))
    tl.store(new_prefix_ptr + block, tl.where(resolves, -1, tl.where(continues, entered, prefix)))


def _advance_triton(
    state: RadixState,
    histogram: torch.Tensor,
    level: int,
    base: torch.Tensor,
    skipped: torch.Tensor,
    blocks: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    moved = tuple(
        torch.empty_like(t) for t in (state.prefix, state.remaining, state.threshold, state.matching)
    )
    n_blocks = state.prefix.numel()
    if n_blocks == 0:
        return moved
    _advance_kernel[(n_blocks,)](
        state.prefix,
        state.remaining,
        state.threshold,
        state.matching,
        histogram.contiguous(),
        base,
        skipped,
        state.prefix if blocks is None else blocks.to(torch.int64),
        *moved,
        BINS=histogram.shape[1],
        SHIFT=LEVELS[level][0],
        LAST=level == NUM_LEVELS - 1,
        MASKED=blocks is not None,
        **LAUNCH_OPTIONS,
    )
    return moved
