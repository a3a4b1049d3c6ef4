"""Fused op 1: row-scale the gradient, update Adam's moments, and count |m| digits.

Per element of every segment (fp32 math, gradient fp32 or bf16):
    g = grad * rowscale[row]            (only for row-scaled segments)
    m = lerp(m, g, 1 - beta1)           (= beta1*m + (1-beta1)*g, as torch.optim.AdamW)
    v = beta2*v + (1-beta2)*g*g
and, when `histogram` is given, histogram[block, digit0(|m|)] += 1 for top-k segments,
which is the first radix-select level fused into the same pass over m; when `nonzero` is given,
nonzero[block] += 1 for every entry of a top-k segment whose new |m| is not 0. A block with fewer
nonzero |m| than k (over all ranks) has the threshold 0 (every entry is selected, see step.py),
which no histogram needs to find: counting the zeros of such a block bin by bin, level by level,
would be the same work on one bin every step. The count is privatised per tile (a lane-wise sum,
one atomic per tile per block), not per element.

With `hinted` (HintedCounts), a block with a window [start, start + width) of level-1 prefixes
p = bits(|m|) >> 10 around where its threshold is expected (start -1: none) counts instead:
above[block] += 1 for entries with p >= start + width, and histogram[block, p - start] += 1 for
those inside the window. Thresholds move little and smoothly between steps, so the new one
usually lies in the window: then these counts fix levels 0 and 1 at once, and the scatter into
2048 level-0 bins (a quarter of the pass's time on a CPU) and the level-1 pass over m are both
saved. The window is far narrower than a level-0 bin (0.1-6% of |m| instead of a quarter octave),
and only its entries are scattered. A block whose threshold left the window is counted again.

One pass moves 20 B per element with an fp32 gradient (read g, m, v; write m, v) and 18 B with
bf16; the reference's separate ops (cast, scale, lerp, mul, addcmul, abs, shift, bincount) move
about 60 B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._cpu import cpu_ops
from ._triton import LAUNCH_OPTIONS, addressable, jit, list_base, load_tile, store_tile, tile_offsets, tl
from .backends import check_backend
from .radix import LEVELS, abs_bits, digit_and_prefix, level_bins
from .segments import DENSE, NO_ROWSCALE, SegmentTable
from .tiles import (
    Shard,
    TensorList,
    TileTable,
    check_block_tensor,
    check_buffers,
    kernel_tensors,
    list_arguments,
    require_flat,
    segment_columns,
    tile_table,
    triton_buffer,
    triton_tiles,
)

# The widest window, in level-1 prefixes (bits(|m|) >> 10): 2^20 float ulps, 6-12% of |m| (by
# where the threshold sits in its octave); the histogram of a window has this many bins.
HINT_WINDOW = 1024
HINT_SHIFT = LEVELS[1][0]

# Triton: TILE and num_warps by shard size from tiles.TRITON_LAUNCH["update_moments"] (e.g. 1024
# elements per program for a 1 Mi shard: 4 warps x 8 contiguous fp32 per thread, two 16-byte loads
# per buffer), over aligned tiles.
# 16384 elements per CPU tile: g, m, v of a tile are 192 KiB (fp32), resident in L2 between the
# vectorised moments loop and the histogram loop that re-reads m.
CPU_TILE = 16384


@dataclass(frozen=True)
class HintedCounts:
    """start, width: int64 [n_blocks], a block's window of level-1 prefixes (start -1: none;
    widths are clamped to [0, HINT_WINDOW]); above: int64 [n_blocks] and histogram: int64
    [n_blocks, HINT_WINDOW], accumulated into (callers zero them)."""

    start: torch.Tensor
    width: torch.Tensor
    above: torch.Tensor
    histogram: torch.Tensor


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
    hinted: HintedCounts | None = None,
    nonzero: torch.Tensor | None = None,
) -> None:
    """Plain PyTorch, one segment at a time."""
    windows = None
    if hinted is not None:
        windows = list(zip(hinted.start.tolist(), hinted.width.tolist(), strict=True))
    for shard_offset, length, param_offset, row_len, block, rowscale_start in table.rows():
        span = slice(shard_offset, shard_offset + length)
        g = grad[span].float()
        if rowscale_start != NO_ROWSCALE:
            rows = segment_rows(param_offset, length, row_len, grad.device)
            g = g * table.rowscale[rowscale_start + rows]
        m, v = exp_avg[span], exp_avg_sq[span]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if block == DENSE:
            continue
        if nonzero is not None:
            nonzero[block] += (abs_bits(m) != 0).sum()
        if windows is not None and hinted is not None and windows[block][0] >= 0:
            start, width = windows[block][0], min(max(windows[block][1], 0), HINT_WINDOW)
            in_window = (abs_bits(m) >> HINT_SHIFT) - start
            hinted.above[block] += (in_window >= width).sum()
            inside = in_window[(in_window >= 0) & (in_window < width)]
            hinted.histogram[block] += torch.bincount(inside, minlength=HINT_WINDOW)
        elif histogram is not None:
            digit, _ = digit_and_prefix(abs_bits(m), 0)
            histogram[block] += torch.bincount(digit, minlength=level_bins(0))


@jit
def _update_moments_kernel(
    grad_ptr,  # [N] fp32 or bf16, the flat gradient shard
    exp_avg_ptr,  # [N] fp32, updated in place
    exp_avg_sq_ptr,  # [N] fp32, updated in place
    tile_segment_ptr,  # [T] int64, segment of each tile
    tile_start_ptr,  # [T] int64, where each tile's window starts (a multiple of TILE)
    shard_offset_ptr,  # [S] int64, the SegmentTable columns
    length_ptr,  # [S] int64
    param_offset_ptr,  # [S] int64
    row_len_ptr,  # [S] int64
    block_ptr,  # [S] int64
    rowscale_start_ptr,  # [S] int64
    rowscale_ptr,  # [R] fp32
    histogram_ptr,  # [n_blocks, BINS] int64, accumulated into (only read when HISTOGRAM)
    window_start_ptr,  # [n_blocks] int64, HintedCounts.start (only read when HINT)
    window_width_ptr,  # [n_blocks] int64, HintedCounts.width (only read when HINT)
    hint_above_ptr,  # [n_blocks] int64, HintedCounts.above, accumulated into
    hint_histogram_ptr,  # [n_blocks, HINT_WINDOW] int64, HintedCounts.histogram, accumulated into
    nonzero_ptr,  # [n_blocks] int64, entries whose new |m| is not 0, accumulated into (when NONZERO)
    tile_tensor_ptr,  # [T] int64, the tensor of each tile (LIST only: tiles.ListTiles)
    tensor_start_ptr,  # [n_tensors] int64, each tensor's first shard element (LIST only)
    grad_addresses_ptr,  # [n_tensors] int64, the gradient tensors' addresses (LIST only)
    exp_avg_addresses_ptr,  # [n_tensors] int64 (LIST only)
    exp_avg_sq_addresses_ptr,  # [n_tensors] int64 (LIST only)
    lerp_weight,  # 1 - beta1 (rounded from double, as the reference's Python scalar)
    beta2,
    one_minus_beta2,  # likewise
    DIGIT_SHIFT: tl.constexpr,  # level-0 digit of |m|: bits >> DIGIT_SHIFT (the top 11 bits)
    BINS: tl.constexpr,
    HISTOGRAM: tl.constexpr,
    HINT_SHIFT: tl.constexpr,  # a window holds the prefixes bits >> HINT_SHIFT from its start on
    HINT_WINDOW: tl.constexpr,
    HINT: tl.constexpr,
    NONZERO: tl.constexpr,
    LIST: tl.constexpr,  # the buffers are TensorLists: each tile's tensor from its address
    TILE: tl.constexpr,
):
    tile = tl.program_id(0)
    segment = tl.load(tile_segment_ptr + tile)
    # [TILE] int64 shard elements from an aligned start; lanes outside the segment are masked
    tile_start, offsets = tile_offsets(tile_start_ptr, tile, TILE)
    if LIST:
        tensor = tl.load(tile_tensor_ptr + tile)
        first = tl.load(tensor_start_ptr + tensor)
        grad_ptr = list_base(grad_ptr, grad_addresses_ptr, tensor, first)
        exp_avg_ptr = list_base(exp_avg_ptr, exp_avg_addresses_ptr, tensor, first)
        exp_avg_sq_ptr = list_base(exp_avg_sq_ptr, exp_avg_sq_addresses_ptr, tensor, first)
    segment_start = tl.load(shard_offset_ptr + segment)
    segment_end = segment_start + tl.load(length_ptr + segment)
    in_segment = (offsets >= segment_start) & (offsets < segment_end)
    full = (tile_start >= segment_start) & (tile_start + TILE <= segment_end)  # no lane masked
    grad = load_tile(grad_ptr, offsets, in_segment, full).to(tl.float32)
    rowscale_start = tl.load(rowscale_start_ptr + segment)
    if rowscale_start >= 0:
        element = tl.load(param_offset_ptr + segment) + (offsets - segment_start)  # index in the parameter
        rows = element // tl.load(row_len_ptr + segment)  # [TILE]; a tile may span several rows
        grad = grad * tl.load(rowscale_ptr + rowscale_start + rows, mask=in_segment)
    exp_avg = load_tile(exp_avg_ptr, offsets, in_segment, full)
    exp_avg_sq = load_tile(exp_avg_sq_ptr, offsets, in_segment, full)
    # torch's lerp: start + w*(end - start) for w < 0.5, else end - (end - start)*(1 - w); the
    # same branch keeps fraction 1 within rounding of torch.optim.AdamW for any beta1.
    if lerp_weight < 0.5:
        exp_avg = exp_avg + lerp_weight * (grad - exp_avg)
    else:
        exp_avg = grad - (grad - exp_avg) * (1 - lerp_weight)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    store_tile(exp_avg_ptr, offsets, exp_avg, in_segment, full)
    store_tile(exp_avg_sq_ptr, offsets, exp_avg_sq, in_segment, full)
    if HISTOGRAM or HINT or NONZERO:
        block = tl.load(block_ptr + segment)
        # DENSE segments count nothing: their upper bound collapses to the tile start.
        counted = (offsets >= segment_start) & (offsets < tl.where(block >= 0, segment_end, tile_start))
        bits = tl.abs(exp_avg).to(tl.int32, bitcast=True)
        digit = (bits >> DIGIT_SHIFT) & (BINS - 1)
        row = tl.maximum(block, 0)
        if NONZERO:  # the tile's count, then one relaxed atomic (a tile lies in one block)
            nonzero = tl.sum((counted & (bits != 0)).to(tl.int64))
            tl.atomic_add(nonzero_ptr + row, nonzero, mask=block >= 0, sem="relaxed")
        window_start = tl.load(window_start_ptr + row, mask=HINT & (block >= 0), other=-1)
        # Counts are the tile's own histogram (shared memory), merged with one relaxed atomic per
        # non-empty bin: a tile lies in one block, so a block of exact zeros costs one atomic per
        # tile on its zero bin, not one per element.
        if window_start >= 0:
            window_width = tl.minimum(tl.maximum(tl.load(window_width_ptr + row), 0), HINT_WINDOW)
            in_window = (bits >> HINT_SHIFT) - window_start  # [TILE] int64
            inside = counted & (in_window >= 0) & (in_window < window_width)
            # [HINT_WINDOW] int32; entries outside the window are masked and held at bin 0
            window_counts = tl.histogram(
                tl.where(inside, in_window, 0).to(tl.int32), HINT_WINDOW, mask=inside
            )
            window_bins = row * HINT_WINDOW + tl.arange(0, HINT_WINDOW)
            tl.atomic_add(
                hint_histogram_ptr + window_bins,
                window_counts.to(tl.int64),
                mask=window_counts > 0,
                sem="relaxed",
            )
            above = tl.sum((counted & (in_window >= window_width)).to(tl.int64))
            tl.atomic_add(hint_above_ptr + row, above, sem="relaxed")
        elif HISTOGRAM:
            digit_counts = tl.histogram(digit, BINS, mask=counted)  # [BINS] int32
            bins = row * BINS + tl.arange(0, BINS)
            tl.atomic_add(
                histogram_ptr + bins, digit_counts.to(tl.int64), mask=digit_counts > 0, sem="relaxed"
            )


def _update_moments_triton(
    grad: Shard,
    exp_avg: Shard,
    exp_avg_sq: Shard,
    table: SegmentTable,
    tiles: TileTable,
    beta1: float,
    beta2: float,
    histogram: torch.Tensor | None,
    hinted: HintedCounts | None,
    nonzero: torch.Tensor | None,
    num_warps: int,
) -> None:
    if tiles.num_tiles == 0:
        return
    unused = tiles.tile_start  # a valid pointer for arguments a constexpr branch never reads
    buffers = [triton_buffer(shard) for shard in (grad, exp_avg, exp_avg_sq)]
    lists = list_arguments(table, tiles, exp_avg, [addresses for _, addresses in buffers])
    _update_moments_kernel[(tiles.num_tiles,)](
        *(pointer for pointer, _ in buffers),
        tiles.tile_segment,
        tiles.tile_start,
        table.shard_offset,
        table.length,
        table.param_offset,
        table.row_len,
        table.block,
        table.rowscale_start,
        addressable(table.rowscale, buffers[1][0]),
        unused if histogram is None else addressable(histogram, unused),
        unused if hinted is None else addressable(hinted.start, unused),
        unused if hinted is None else addressable(hinted.width, unused),
        unused if hinted is None else addressable(hinted.above, unused),
        unused if hinted is None else addressable(hinted.histogram, unused),
        unused if nonzero is None else addressable(nonzero, unused),
        *lists,
        1 - beta1,
        beta2,
        1 - beta2,
        DIGIT_SHIFT=LEVELS[0][0],
        BINS=level_bins(0),
        HISTOGRAM=histogram is not None,
        HINT_SHIFT=HINT_SHIFT,
        HINT_WINDOW=HINT_WINDOW,
        HINT=hinted is not None,
        NONZERO=nonzero is not None,
        LIST=isinstance(exp_avg, TensorList),
        TILE=tiles.tile_size,
        num_warps=num_warps,
        **LAUNCH_OPTIONS,
    )


def _update_moments_cpu(
    grad: Shard,
    exp_avg: Shard,
    exp_avg_sq: Shard,
    table: SegmentTable,
    tiles: TileTable,
    beta1: float,
    beta2: float,
    histogram: torch.Tensor | None,
    hinted: HintedCounts | None,
    nonzero: torch.Tensor | None,
) -> None:
    cpu_ops().update_moments(
        grad=kernel_tensors(grad),
        exp_avg=kernel_tensors(exp_avg),
        exp_avg_sq=kernel_tensors(exp_avg_sq),
        segments=segment_columns(table, exp_avg),
        rowscale=table.rowscale,
        tile_segment=tiles.tile_segment,
        tile_start=tiles.tile_start,
        tile_size=tiles.tile_size,
        histogram=histogram,
        bins=level_bins(0),
        shift=LEVELS[0][0],
        window_start=None if hinted is None else hinted.start,
        window_width=None if hinted is None else hinted.width,
        hint_above=None if hinted is None else hinted.above,
        hint_histogram=None if hinted is None else hinted.histogram,
        hint_bins=HINT_WINDOW,
        hint_shift=HINT_SHIFT,
        nonzero=nonzero,
        beta1=beta1,
        beta2=beta2,
    )


def update_moments(
    grad: Shard,
    exp_avg: Shard,
    exp_avg_sq: Shard,
    table: SegmentTable,
    *,
    beta1: float,
    beta2: float,
    histogram: torch.Tensor | None = None,
    hinted: HintedCounts | None = None,
    nonzero: torch.Tensor | None = None,
    backend: str = "torch",
) -> None:
    """Run the op with the named backend (see dsforget.kernels.backends).

    exp_avg, exp_avg_sq: flat fp32 shards, updated in place on segment elements only (or, on the
    "cpu" backend, TensorLists: the same shard as separate tensors, see tiles.TensorList).
    histogram: int64 [n_blocks, level_bins(0)], accumulated into (callers zero it).
    hinted: the counts that replace `histogram` for blocks with a window (the others count into
    `histogram`, if given).
    nonzero: int64 [n_blocks], accumulated into: every block's entries whose new |m| is not 0
    (bits(|m|) != 0: -0.0 is a zero, NaN is not).
    """
    device = exp_avg.device
    check_backend("update_moments", backend, device)
    require_flat("update_moments", backend, grad, exp_avg, exp_avg_sq)
    if backend == "torch":
        update_moments_reference(
            grad,
            exp_avg,
            exp_avg_sq,
            table,
            beta1=beta1,
            beta2=beta2,
            histogram=histogram,
            hinted=hinted,
            nonzero=nonzero,
        )
        return
    if backend == "cpu":
        tiles, num_warps = tile_table(table, CPU_TILE), 0
    else:
        tiles, num_warps = triton_tiles(table, "update_moments")
    check_buffers("update_moments", tiles, grad, backend=backend, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    if histogram is not None:
        check_block_tensor("update_moments", "histogram", histogram, table, device, level_bins(0))
    if hinted is not None:
        check_block_tensor("update_moments", "window_start", hinted.start, table, device)
        check_block_tensor("update_moments", "window_width", hinted.width, table, device)
        check_block_tensor("update_moments", "hint_above", hinted.above, table, device)
        check_block_tensor("update_moments", "hint_histogram", hinted.histogram, table, device, HINT_WINDOW)
    if nonzero is not None:
        check_block_tensor("update_moments", "nonzero", nonzero, table, device)
    arguments = (grad, exp_avg, exp_avg_sq, table, tiles, beta1, beta2, histogram, hinted, nonzero)
    if backend == "cpu":
        _update_moments_cpu(*arguments)
    else:
        _update_moments_triton(*arguments, num_warps)
