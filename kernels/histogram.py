"""Fused op 2: one refinement level of the radix select, a histogram of |m| digits.

For every top-k segment whose block is still unresolved, counts the entries whose higher bits
equal the block's prefix, binned by this level's digit: histogram[block, digit] += 1.
Only m is read (4 bytes per element); nothing full-size is written.
"""

from __future__ import annotations

import torch

from ._cpu import cpu_ops
from ._triton import LAUNCH_OPTIONS, addressable, jit, list_base, load_tile, tile_offsets, tl
from .backends import check_backend
from .masked_update import DeferredEntries
from .radix import LEVELS, RESOLVED, abs_bits, digit_and_prefix, level_bins
from .segments import DENSE, SegmentTable
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

# Triton: TILE and num_warps by shard size from tiles.TRITON_LAUNCH["abs_histogram"] (twice the
# moments kernel's tiles: m is its only input), over aligned tiles. Not yet tuned on a GPU.
# CPU: 64K elements (256 KiB of m) per tile; the loop streams m once, so the tile only sets
# the work-split granularity (~250 tiles for a 16M-element shard).
CPU_TILE = 65536


def abs_histogram_reference(
    exp_avg: torch.Tensor, table: SegmentTable, prefix: torch.Tensor, level: int, histogram: torch.Tensor
) -> None:
    prefixes = prefix.tolist()
    for shard_offset, length, _, _, block, _ in table.rows():
        if block == DENSE or prefixes[block] == RESOLVED:
            continue
        digit, high = digit_and_prefix(abs_bits(exp_avg[shard_offset : shard_offset + length]), level)
        histogram[block] += torch.bincount(digit[high == prefixes[block]], minlength=level_bins(level))


@jit
def _abs_histogram_kernel(
    exp_avg_ptr,  # [N] fp32, read only
    tile_segment_ptr,  # [T] int64, segment of each tile
    tile_start_ptr,  # [T] int64, where each tile's window starts (a multiple of TILE)
    shard_offset_ptr,  # [S] int64, the SegmentTable columns
    length_ptr,  # [S] int64
    block_ptr,  # [S] int64
    prefix_ptr,  # [n_blocks] int64, RESOLVED (-1) once a block's threshold is known
    histogram_ptr,  # [n_blocks, BINS] int64, accumulated into
    tile_tensor_ptr,  # [T] int64, the tensor of each tile (LIST only: tiles.ListTiles)
    tensor_start_ptr,  # [n_tensors] int64, each tensor's first shard element (LIST only)
    exp_avg_addresses_ptr,  # [n_tensors] int64, the exp_avg tensors' addresses (LIST only)
    DIGIT_SHIFT: tl.constexpr,  # this level's digit: (bits >> DIGIT_SHIFT) & (BINS - 1)
    BINS: tl.constexpr,
    PREFIX_SHIFT: tl.constexpr,  # the higher bits that must equal the prefix: bits >> PREFIX_SHIFT
    LIST: tl.constexpr,  # exp_avg is a TensorList: each tile's tensor from its address
    TILE: tl.constexpr,
):
    tile = tl.program_id(0)
    segment = tl.load(tile_segment_ptr + tile)
    # [TILE] int64 shard elements from an aligned start; lanes outside the segment are masked
    tile_start, offsets = tile_offsets(tile_start_ptr, tile, TILE)
    if LIST:
        tensor = tl.load(tile_tensor_ptr + tile)
        first = tl.load(tensor_start_ptr + tensor)
        exp_avg_ptr = list_base(exp_avg_ptr, exp_avg_addresses_ptr, tensor, first)
    segment_start = tl.load(shard_offset_ptr + segment)
    segment_end = segment_start + tl.load(length_ptr + segment)
    block = tl.load(block_ptr + segment)
    prefix = tl.load(prefix_ptr + tl.maximum(block, 0), mask=block >= 0, other=-1)
    # DENSE and resolved (prefix RESOLVED = -1) blocks read nothing: their upper bound collapses
    # to the tile start, and they never take the unmasked path.
    active = (block >= 0) & (prefix >= 0)
    in_block = (offsets >= segment_start) & (offsets < tl.where(active, segment_end, tile_start))
    full = active & (tile_start >= segment_start) & (tile_start + TILE <= segment_end)  # no lane masked
    bits = tl.abs(load_tile(exp_avg_ptr, offsets, in_block, full)).to(tl.int32, bitcast=True)
    digit = (bits >> DIGIT_SHIFT) & (BINS - 1)
    # level 0: the prefix is 0 and so is bits >> 31 (|m| has no sign bit)
    counted = in_block & ((bits >> PREFIX_SHIFT) == prefix)
    # The tile's own histogram (shared memory), then one relaxed atomic per non-empty bin: a tile
    # lies in one block, and |m| of a tile spans few bins, so ~TILE/30 global atomics instead of
    # TILE (one per element, all on one address for a block of exact zeros).
    tile_counts = tl.histogram(digit, BINS, mask=counted)  # [BINS] int32
    bins = tl.maximum(block, 0) * BINS + tl.arange(0, BINS)
    tl.atomic_add(histogram_ptr + bins, tile_counts.to(tl.int64), mask=tile_counts > 0, sem="relaxed")


def _abs_histogram_triton(
    exp_avg: Shard,
    table: SegmentTable,
    tiles: TileTable,
    prefix: torch.Tensor,
    level: int,
    histogram: torch.Tensor,
    num_warps: int,
) -> None:
    if tiles.num_tiles == 0:
        return
    pointer, addresses = triton_buffer(exp_avg)
    _abs_histogram_kernel[(tiles.num_tiles,)](
        pointer,
        tiles.tile_segment,
        tiles.tile_start,
        table.shard_offset,
        table.length,
        table.block,
        addressable(prefix, tiles.tile_start),
        addressable(histogram, tiles.tile_start),
        *list_arguments(table, tiles, exp_avg, [addresses]),
        DIGIT_SHIFT=LEVELS[level][0],
        BINS=level_bins(level),
        PREFIX_SHIFT=sum(LEVELS[level]),
        LIST=isinstance(exp_avg, TensorList),
        TILE=tiles.tile_size,
        num_warps=num_warps,
        **LAUNCH_OPTIONS,
    )


def _abs_histogram_cpu(
    exp_avg: Shard,
    table: SegmentTable,
    tiles: TileTable,
    prefix: torch.Tensor,
    level: int,
    histogram: torch.Tensor,
) -> None:
    shift, bits = LEVELS[level]
    cpu_ops().abs_histogram(
        exp_avg=kernel_tensors(exp_avg),
        segments=segment_columns(table, exp_avg),
        tile_segment=tiles.tile_segment,
        tile_start=tiles.tile_start,
        tile_size=tiles.tile_size,
        prefix=addressable(prefix, tiles.tile_start),
        histogram=addressable(histogram, tiles.tile_start),
        shift=shift,
        bits=bits,
    )


def abs_histogram(
    exp_avg: Shard,
    table: SegmentTable,
    prefix: torch.Tensor,
    level: int,
    histogram: torch.Tensor,
    *,
    backend: str = "torch",
) -> None:
    """Accumulate into `histogram` (int64 [n_blocks, level_bins(level)]).

    prefix: int64 [n_blocks], RadixState.prefix (the digits fixed by earlier levels, RESOLVED
    for blocks that need no more counting).
    """
    device = exp_avg.device
    check_backend("abs_histogram", backend, device)
    require_flat("abs_histogram", backend, exp_avg)
    if backend == "torch":
        abs_histogram_reference(exp_avg, table, prefix, level, histogram)
        return
    if not 0 <= level < len(LEVELS):
        raise ValueError(f"abs_histogram: level must be in [0, {len(LEVELS)}), got {level}")
    if backend == "cpu":
        tiles, num_warps = tile_table(table, CPU_TILE), 0
    else:
        tiles, num_warps = triton_tiles(table, "abs_histogram")
    check_buffers("abs_histogram", tiles, backend=backend, exp_avg=exp_avg)
    check_block_tensor("abs_histogram", "prefix", prefix, table, device)
    check_block_tensor("abs_histogram", "histogram", histogram, table, device, level_bins(level))
    if backend == "cpu":
        _abs_histogram_cpu(exp_avg, table, tiles, prefix, level, histogram)
    else:
        _abs_histogram_triton(exp_avg, table, tiles, prefix, level, histogram, num_warps)


def deferred_histogram(
    deferred: DeferredEntries,
    prefix: torch.Tensor,
    level: int,
    histogram: torch.Tensor,
    backend: str = "torch",
) -> None:
    """abs_histogram over the entries `masked_adamw` deferred instead of whole segments (the list
    is short: a few torch ops on any device, one C++ loop on the "cpu" backend; a Triton list's
    count is read on the device)."""
    if deferred.index.numel() == 0:
        return
    if backend == "cpu":
        shift, width = LEVELS[level]
        deferred = deferred.compacted()
        cpu_ops().deferred_histogram(
            exp_avg=deferred.exp_avg,
            block=deferred.block,
            prefix=prefix,
            histogram=histogram,
            shift=shift,
            bits=width,
        )
        return
    digit, high = digit_and_prefix(abs_bits(deferred.exp_avg), level)
    # high >= 0 never equals RESOLVED (-1): resolved blocks count nothing
    counted = high == prefix.index_select(0, deferred.block)
    if deferred.count is not None:  # (a Triton list: its slots past the count hold no entry)
        counted &= torch.arange(counted.numel(), device=counted.device) < deferred.count
    histogram.view(-1).index_add_(0, deferred.block * level_bins(level) + digit, counted.to(histogram.dtype))
