"""Fused op 3: the masked, bias-corrected, decoupled-weight-decay AdamW update.

Per element of every segment:
    selected = block == DENSE  or  bits(|m|) >= threshold[block]
    p *= 1 - lr*wd                     (all entries; only selected ones if decay_selected_only)
    p -= selected * lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
The formula and its order follow torch.optim.AdamW so fraction 1 reproduces it (the CPU kernel
multiplies by 1/sqrt(bc2) instead of dividing: within an ulp of the denominator).

One pass moves 16 B per element (read p, m, v; write p) and builds no mask tensor.

Deferral: with `defer_prefix`, the entries of a block whose bits(|m|) >> DEFER_SHIFT equal its
prefix (the last radix level's bin, which holds the still unknown threshold) keep their p and
are returned as a short list; `apply_deferred` updates them once the threshold is exact. The
threshold passed for such a block must be the first bit pattern above that bin. This saves the
last histogram pass over m; the list holds the entries of one level-2 bin, a few in 10^5 of a
block for smooth |m| distributions. The Triton kernel compacts them on the device: each program
takes its slots with one atomic add, so the caller states how many there can be
(`defer_capacity`: the deferred bins' entry counts summed over ranks bound every rank's share);
the list keeps that length and its count stays on the device, read by the Triton
`deferred_histogram` and `apply_deferred` there: no host sync between the update and the
deferred entries' own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._cpu import cpu_ops
from ._triton import LAUNCH_OPTIONS, addressable, jit, list_base, load_tile, store_tile, tile_offsets, tl
from .backends import check_backend
from .radix import LEVELS, RESOLVED, abs_bits
from .segments import DENSE, SegmentTable, host_counters
from .tiles import (
    Shard,
    TensorList,
    TileTable,
    check_block_tensor,
    check_buffers,
    device_starts,
    kernel_tensors,
    list_arguments,
    require_flat,
    segment_columns,
    shard_starts,
    tile_table,
    triton_buffer,
    triton_tiles,
)

# Triton: TILE and num_warps by shard size from tiles.TRITON_LAUNCH["masked_adamw"], over aligned
# tiles.
# 16384 elements per CPU tile (p, m, v: 192 KiB); sets the work-split granularity only.
CPU_TILE = 16384
DEFER_SHIFT = LEVELS[-1][0] + LEVELS[-1][1]  # a deferred bin fixes every bit above the last level's digit
# defer_prefix of a block that defers nothing: the prefix RadixState gives a resolved block, so a
# state's prefix is the defer_prefix of a step that defers every open block's bin
NO_DEFERRAL = RESOLVED


@dataclass(frozen=True)
class DeferredEntries:
    """Entries the masked update left untouched: shard indices (ascending), their blocks, and
    their m and v, copied while the update had them in cache (the entries are scattered over the
    shard: resolving them then reads only p there).

    count: None when every slot holds an entry. The Triton kernel lists entries in the order its
    programs take their slots, into a list kept at the capacity the caller reserved, and leaves
    the number it listed on the device (int64 [1]; block 0 in the slots past it), so that no host
    sync reads it: `compacted` gives the exact list in shard order.
    """

    index: torch.Tensor
    block: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    count: torch.Tensor | None = None

    def compacted(self) -> DeferredEntries:
        """The listed entries alone, in shard order (reads `count` on the host)."""
        if self.count is None:
            return self
        taken = int(self.count.item())
        index, order = self.index[:taken].sort()
        return DeferredEntries(
            index, self.block[:taken][order], self.exp_avg[:taken][order], self.exp_avg_sq[:taken][order]
        )


@dataclass(frozen=True)
class CounterCorrections:
    """Bias corrections that differ between the segments of one shard: one per step counter (a
    parameter's own count of moment updates; SegmentTable.counter names each segment's).

    bias_corrections[c]: (1 - beta1^t_c, 1 - beta2^t_c) of counter c's 1-based count t_c, in
    double precision; block_counter[b]: the counter of block b (SegmentTable.block_counter), for
    the ops that update entries listed by block.
    """

    bias_corrections: tuple[tuple[float, float], ...]
    block_counter: tuple[int, ...]

    def kernel_tensor(
        self, lr: float, device: torch.device, counters: list[int] | None = None
    ) -> torch.Tensor:
        """fp32 [C, 2]: (step_size, bias_correction2_sqrt) per counter (or per entry of `counters`),
        rounded from double as a kernel rounds its scalar arguments: a counter of the uniform
        step's count gets its constants bit for bit."""
        chosen = range(len(self.bias_corrections)) if counters is None else counters
        values = [(lr / self.bias_corrections[c][0], math.sqrt(self.bias_corrections[c][1])) for c in chosen]
        return torch.tensor(values, dtype=torch.float32).reshape(-1, 2).to(device)

    def block_tensor(self, lr: float, device: torch.device) -> torch.Tensor:
        """fp32 [n_blocks, 2]: the constants of each block's counter."""
        return self.kernel_tensor(lr, device, list(self.block_counter))


@dataclass(frozen=True)
class AdamWScalars:
    """The scalars of one step's masked AdamW update, as torch.optim.AdamW computes them (in
    double precision; kernels round them to fp32).

    per_counter: None when every segment's moments have seen the same number of updates (the
    bias corrections above apply to all); otherwise each segment's own (HFT resampling holds
    some parameters while others train), and bias_correction1/2 are unused by the kernels.
    """

    lr: float
    bias_correction1: float
    bias_correction2: float
    eps: float
    weight_decay: float
    decay_selected_only: bool = False
    per_counter: CounterCorrections | None = None

    @staticmethod
    def at_step(
        step: int,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        decay_selected_only: bool,
    ) -> AdamWScalars:
        """For the 1-based `step` being taken."""
        beta1, beta2 = betas
        return AdamWScalars(lr, 1 - beta1**step, 1 - beta2**step, eps, weight_decay, decay_selected_only)

    @staticmethod
    def at_counts(
        counts: Sequence[int],
        table: SegmentTable,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        decay_selected_only: bool,
    ) -> AdamWScalars:
        """For a step where segment s takes its counter's 1-based step counts[table.counter[s]]:
        `at_step` (the uniform scalars, bit for bit the same step) when all of the table's
        counters have one count, per-counter corrections otherwise."""
        segment_counters, block_counters = host_counters(table)
        used = set(segment_counters)
        if any(not 0 <= c < len(counts) for c in used):
            raise ValueError(f"the table's counters {sorted(used)} index {len(counts)} counts")
        distinct = {counts[c] for c in used}
        keywords = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decay_selected_only=decay_selected_only
        )
        if len(distinct) <= 1:
            step = distinct.pop() if distinct else 1  # (no segment: scalars no op reads)
            return AdamWScalars.at_step(step, **keywords)
        beta1, beta2 = betas
        # a counter at 0 has seen no update: none of the table's segments follows it (they all
        # update now); (1, 1) keeps its never-read constants finite
        corrections = CounterCorrections(
            tuple((1 - beta1**t, 1 - beta2**t) if t > 0 else (1.0, 1.0) for t in counts), block_counters
        )
        return dataclasses.replace(AdamWScalars.at_step(max(distinct), **keywords), per_counter=corrections)

    def for_counter(self, counter: int) -> AdamWScalars:
        """The uniform scalars of segments of `counter` (these scalars if they are uniform)."""
        if self.per_counter is None:
            return self
        bias_correction1, bias_correction2 = self.per_counter.bias_corrections[counter]
        return dataclasses.replace(
            self, bias_correction1=bias_correction1, bias_correction2=bias_correction2, per_counter=None
        )

    def counter_tensor(self, device: torch.device) -> torch.Tensor | None:
        """fp32 [C, 2] per-counter (step_size, bias_correction2_sqrt) for the kernels, or None."""
        return None if self.per_counter is None else self.per_counter.kernel_tensor(self.lr, device)

    def block_tensor(self, device: torch.device) -> torch.Tensor | None:
        """fp32 [n_blocks, 2]: the same per block (for entries listed by block), or None."""
        return None if self.per_counter is None else self.per_counter.block_tensor(self.lr, device)

    @property
    def step_size(self) -> float:
        return self.lr / self.bias_correction1

    @property
    def bias_correction2_sqrt(self) -> float:
        return math.sqrt(self.bias_correction2)

    @property
    def decay(self) -> float:
        return 1 - self.lr * self.weight_decay

    @property
    def decay_unselected(self) -> float:
        return 1.0 if self.decay_selected_only else self.decay

    def kernel_arguments(self) -> tuple[float, float, float, float, float]:
        """step_size, bias_correction2_sqrt, eps, decay of selected and of unselected entries."""
        return self.step_size, self.bias_correction2_sqrt, self.eps, self.decay, self.decay_unselected

    def kernel_keywords(self) -> dict[str, float]:
        """`kernel_arguments` by the names the C++ ops' schemas give them."""
        names = ("step_size", "bias_correction2_sqrt", "eps", "decay_selected", "decay_unselected")
        return dict(zip(names, self.kernel_arguments(), strict=True))


def _update_entries(
    p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, selected: torch.Tensor | None, scalars: AdamWScalars
) -> None:
    """The update of entries p (in place) in the reference's op order; selected None: all of them."""
    denom = (v.sqrt() / scalars.bias_correction2_sqrt).add_(scalars.eps)
    if selected is None:
        p.mul_(scalars.decay)
        p.addcdiv_(m, denom, value=-scalars.step_size)
        return
    if scalars.decay_selected_only:
        p.mul_(torch.where(selected, scalars.decay, 1.0))
    else:
        p.mul_(scalars.decay)
    p.addcdiv_(torch.where(selected, m, 0.0), denom, value=-scalars.step_size)


def masked_adamw_reference(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    table: SegmentTable,
    thresholds: torch.Tensor,
    scalars: AdamWScalars,
    defer_prefix: torch.Tensor | None = None,
) -> DeferredEntries | None:
    threshold_list = thresholds.tolist()
    defer_list = defer_prefix.tolist() if defer_prefix is not None else None
    deferred_index, deferred_block = [], []
    for (shard_offset, length, _, _, block, _), counter in zip(
        table.rows(), table.counter.tolist(), strict=True
    ):
        span = slice(shard_offset, shard_offset + length)
        p, m, v = param[span], exp_avg[span], exp_avg_sq[span]
        segment_scalars = scalars.for_counter(counter)
        if block == DENSE:
            _update_entries(p, m, v, None, segment_scalars)
            continue
        kept = None
        if defer_list is not None and defer_list[block] != NO_DEFERRAL:
            deferred = (abs_bits(m) >> DEFER_SHIFT) == defer_list[block]
            kept = (deferred.nonzero().squeeze(1), p[deferred].clone())
        _update_entries(p, m, v, abs_bits(m) >= threshold_list[block], segment_scalars)
        if kept is not None:
            offsets, values = kept
            p[offsets] = values
            deferred_index.append(offsets + shard_offset)
            deferred_block.append(torch.full_like(offsets, block))
    if defer_list is None:
        return None
    if not deferred_index:
        return _no_entries(param.device)
    index, order = torch.cat(deferred_index).sort()
    return DeferredEntries(index, torch.cat(deferred_block)[order], exp_avg[index], exp_avg_sq[index])


def _no_entries(device: torch.device) -> DeferredEntries:
    empty = torch.empty(0, dtype=torch.int64, device=device)
    return DeferredEntries(empty, empty.clone(), torch.empty(0, device=device), torch.empty(0, device=device))


def apply_deferred(
    param: Shard,
    deferred: DeferredEntries,
    thresholds: torch.Tensor,
    scalars: AdamWScalars,
    backend: str = "torch",
) -> None:
    """Update the entries `masked_adamw` deferred, now that `thresholds` are exact (the list is
    short: plain indexing on any device, one C++ loop on the "cpu" backend)."""
    if deferred.index.numel() == 0:
        return
    require_flat("apply_deferred", backend, param)
    if backend == "triton":
        _apply_deferred_triton(param, deferred, thresholds, scalars)
        return
    deferred = deferred.compacted()
    if backend == "cpu":
        cpu_ops().apply_deferred(
            param=kernel_tensors(param),
            tensor_starts=shard_starts(param),
            index=deferred.index,
            block=deferred.block,
            exp_avg=deferred.exp_avg,
            exp_avg_sq=deferred.exp_avg_sq,
            thresholds=thresholds,
            block_corrections=scalars.block_tensor(param.device),
            **scalars.kernel_keywords(),
        )
        return
    if scalars.per_counter is None:
        _apply_listed(
            param, deferred.index, deferred.exp_avg, deferred.exp_avg_sq, deferred.block, thresholds, scalars
        )
        return
    for block in deferred.block.unique().tolist():  # (a block has one counter)
        of_block = (deferred.block == block).nonzero().squeeze(1)
        _apply_listed(
            param,
            deferred.index[of_block],
            deferred.exp_avg[of_block],
            deferred.exp_avg_sq[of_block],
            deferred.block[of_block],
            thresholds,
            scalars.for_counter(scalars.per_counter.block_counter[block]),
        )


def _apply_listed(
    param: torch.Tensor,
    index: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    block: torch.Tensor,
    thresholds: torch.Tensor,
    scalars: AdamWScalars,
) -> None:
    p = param.index_select(0, index)
    selected = abs_bits(exp_avg) >= thresholds.index_select(0, block)
    _update_entries(p, exp_avg, exp_avg_sq, selected, scalars)
    param.index_copy_(0, index, p)


@jit
def _masked_adamw_kernel(
    param_ptr,  # [N] fp32, updated in place
    exp_avg_ptr,  # [N] fp32, read only
    exp_avg_sq_ptr,  # [N] fp32, read only
    tile_segment_ptr,  # [T] int64, segment of each tile
    tile_start_ptr,  # [T] int64, where each tile's window starts (a multiple of TILE)
    shard_offset_ptr,  # [S] int64, the SegmentTable columns
    length_ptr,  # [S] int64
    block_ptr,  # [S] int64
    thresholds_ptr,  # [n_blocks] int64, bit pattern of the smallest selected |m|
    defer_prefix_ptr,  # [n_blocks] int64, bits >> DEFER_SHIFT of the entries to leave (DEFER only)
    slots_taken_ptr,  # [1] int64, deferred entries written so far (DEFER only)
    deferred_index_ptr,  # [capacity] int64, the deferred entries' shard indices (DEFER only)
    deferred_block_ptr,  # [capacity] int64, and blocks
    deferred_exp_avg_ptr,  # [capacity] fp32, and m
    deferred_exp_avg_sq_ptr,  # [capacity] fp32, and v
    counter_ptr,  # [S] int64, SegmentTable.counter (PER_COUNTER only)
    corrections_ptr,  # [C, 2] fp32, step_size and bias_correction2_sqrt per counter (PER_COUNTER only)
    tile_tensor_ptr,  # [T] int64, the tensor of each tile (LIST only: tiles.ListTiles)
    tensor_start_ptr,  # [n_tensors] int64, each tensor's first shard element (LIST only)
    param_addresses_ptr,  # [n_tensors] int64, the parameter tensors' addresses (LIST only)
    exp_avg_addresses_ptr,  # [n_tensors] int64 (LIST only)
    exp_avg_sq_addresses_ptr,  # [n_tensors] int64 (LIST only)
    defer_capacity,  # slots in the list: entries past it are left unwritten (and reported)
    step_size,  # lr / bias_correction1
    bias_correction2_sqrt,
    eps,
    decay_selected,  # 1 - lr*wd
    decay_unselected,  # 1 - lr*wd, or 1 when decay_selected_only
    DEFER_SHIFT: tl.constexpr,
    DEFER: tl.constexpr,
    PER_COUNTER: tl.constexpr,  # each segment's bias corrections from its counter's row
    LIST: tl.constexpr,  # the buffers are TensorLists: each tile's tensor from its address
    TILE: tl.constexpr,
):
    tile = tl.program_id(0)
    segment = tl.load(tile_segment_ptr + tile)
    if LIST:
        tensor = tl.load(tile_tensor_ptr + tile)
        first = tl.load(tensor_start_ptr + tensor)
        param_ptr = list_base(param_ptr, param_addresses_ptr, tensor, first)
        exp_avg_ptr = list_base(exp_avg_ptr, exp_avg_addresses_ptr, tensor, first)
        exp_avg_sq_ptr = list_base(exp_avg_sq_ptr, exp_avg_sq_addresses_ptr, tensor, first)
    if PER_COUNTER:
        counter = tl.load(counter_ptr + segment)
        step_size = tl.load(corrections_ptr + 2 * counter)
        bias_correction2_sqrt = tl.load(corrections_ptr + 2 * counter + 1)
    # [TILE] int64 shard elements from an aligned start; lanes outside the segment are masked
    tile_start, offsets = tile_offsets(tile_start_ptr, tile, TILE)
    segment_start = tl.load(shard_offset_ptr + segment)
    segment_end = segment_start + tl.load(length_ptr + segment)
    block = tl.load(block_ptr + segment)
    # DENSE segments get threshold 0, which every bits(|m|) reaches (NaN included).
    threshold = tl.load(thresholds_ptr + tl.maximum(block, 0), mask=block >= 0, other=0)
    in_segment = (offsets >= segment_start) & (offsets < segment_end)
    full = (tile_start >= segment_start) & (tile_start + TILE <= segment_end)  # no lane masked
    param = load_tile(param_ptr, offsets, in_segment, full)
    exp_avg = load_tile(exp_avg_ptr, offsets, in_segment, full)
    exp_avg_sq = load_tile(exp_avg_sq_ptr, offsets, in_segment, full)
    bits = tl.abs(exp_avg).to(tl.int32, bitcast=True)
    selected = bits >= threshold
    # IEEE sqrt and division (Triton's defaults are approximate), as torch computes them.
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    updated = param * tl.where(selected, decay_selected, decay_unselected)
    updated = updated + tl.div_rn(-step_size * tl.where(selected, exp_avg, 0.0), denom)
    if DEFER:
        # NO_DEFERRAL (-1) and DENSE blocks match no bits >> DEFER_SHIFT (always >= 0)
        prefix = tl.load(defer_prefix_ptr + tl.maximum(block, 0), mask=block >= 0, other=-1)
        deferred = in_segment & ((bits >> DEFER_SHIFT).to(tl.int64) == prefix)
        flags = deferred.to(tl.int64)
        first_slot = tl.atomic_add(slots_taken_ptr, tl.sum(flags, 0))
        slot = first_slot + tl.cumsum(flags, 0) - 1
        listed = deferred & (slot < defer_capacity)
        tl.store(deferred_index_ptr + slot, offsets, mask=listed)
        tl.store(deferred_block_ptr + slot, tl.zeros_like(offsets) + block, mask=listed)
        tl.store(deferred_exp_avg_ptr + slot, exp_avg, mask=listed)
        tl.store(deferred_exp_avg_sq_ptr + slot, exp_avg_sq, mask=listed)
        updated = tl.where(deferred, param, updated)
    store_tile(param_ptr, offsets, updated, in_segment, full)


def _masked_adamw_triton(
    param: Shard,
    exp_avg: Shard,
    exp_avg_sq: Shard,
    table: SegmentTable,
    tiles: TileTable,
    thresholds: torch.Tensor,
    scalars: AdamWScalars,
    defer_prefix: torch.Tensor | None,
    defer_capacity: int,
    num_warps: int = 4,
) -> DeferredEntries | None:
    if tiles.num_tiles == 0:
        return None if defer_prefix is None else _no_entries(param.device)
    buffers = [triton_buffer(shard) for shard in (param, exp_avg, exp_avg_sq)]
    param_pointer = buffers[0][0]  # (also an fp32 stand-in for pointers a constexpr branch never reads)
    if defer_prefix is None:  # int64 and fp32 stand-ins for the list, which DEFER=False never touches
        capacity, slots_taken = 0, tiles.tile_start
        listed = (tiles.tile_start,) * 2 + (param_pointer,) * 2
    else:
        capacity = defer_capacity
        slots_taken = torch.zeros(1, dtype=torch.int64, device=param.device)
        index = torch.empty(max(capacity, 1), dtype=torch.int64, device=param.device)  # (a valid address)
        # block 0 in the slots left empty: deferred_histogram indexes by block before it masks
        listed = (index, torch.zeros_like(index), *torch.empty(2, index.numel(), device=param.device))
    thresholds = addressable(thresholds, tiles.tile_start)
    corrections = scalars.counter_tensor(param.device)
    _masked_adamw_kernel[(tiles.num_tiles,)](
        *(pointer for pointer, _ in buffers),
        tiles.tile_segment,
        tiles.tile_start,
        table.shard_offset,
        table.length,
        table.block,
        thresholds,
        thresholds if defer_prefix is None else addressable(defer_prefix, tiles.tile_start),
        slots_taken,
        *listed,
        table.counter,
        param_pointer if corrections is None else corrections,
        *list_arguments(table, tiles, param, [addresses for _, addresses in buffers]),
        capacity,
        *scalars.kernel_arguments(),
        DEFER_SHIFT=DEFER_SHIFT,
        DEFER=defer_prefix is not None,
        PER_COUNTER=corrections is not None,
        LIST=isinstance(param, TensorList),
        TILE=tiles.tile_size,
        num_warps=num_warps,
        **LAUNCH_OPTIONS,
    )
    if defer_prefix is None:
        return None
    # no host sync: the list keeps its capacity, its length stays on the device
    torch._assert_async(
        slots_taken[0] <= capacity,
        f"masked_adamw: more entries deferred than defer_capacity={capacity} (a caller's bound that "
        "is too small: the entries beyond it kept their p)",
    )
    return DeferredEntries(*listed, count=slots_taken)


# Deferred entries per Triton program of apply_deferred (a list of a few entries per 10^5)
APPLY_SLOTS = 256


@jit
def _apply_deferred_kernel(
    param_ptr,  # [N] fp32, updated in place at the listed indices
    index_ptr,  # [capacity] int64, DeferredEntries.index
    block_ptr,  # [capacity] int64, DeferredEntries.block
    exp_avg_ptr,  # [capacity] fp32, DeferredEntries.exp_avg
    exp_avg_sq_ptr,  # [capacity] fp32, DeferredEntries.exp_avg_sq
    count_ptr,  # [1] int64, how many slots hold entries
    thresholds_ptr,  # [n_blocks] int64, exact now
    corrections_ptr,  # [n_blocks, 2] fp32, step_size and bias_correction2_sqrt per block (PER_COUNTER only)
    tensor_start_ptr,  # [n_tensors] int64, each tensor's first shard element (LIST only)
    param_addresses_ptr,  # [n_tensors] int64, the parameter tensors' addresses (LIST only)
    n_tensors,
    step_size,
    bias_correction2_sqrt,
    eps,
    decay_selected,
    decay_unselected,
    PER_COUNTER: tl.constexpr,
    LIST: tl.constexpr,  # param is a TensorList: each entry's tensor found in tensor_start
    SEARCH_STEPS: tl.constexpr,  # (LIST) halvings of [0, n_tensors) that leave one tensor
    SLOTS: tl.constexpr,
):
    slots = tl.program_id(0) * SLOTS + tl.arange(0, SLOTS)
    listed = slots < tl.load(count_ptr)
    index = tl.load(index_ptr + slots, mask=listed, other=0)
    block = tl.load(block_ptr + slots, mask=listed, other=0)
    exp_avg = tl.load(exp_avg_ptr + slots, mask=listed, other=0.0)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + slots, mask=listed, other=0.0)
    if PER_COUNTER:
        step_size = tl.load(corrections_ptr + 2 * block, mask=listed, other=0.0)
        bias_correction2_sqrt = tl.load(corrections_ptr + 2 * block + 1, mask=listed, other=1.0)
    if LIST:  # the entry's tensor: the last one that starts at or before it
        low = tl.zeros_like(index)
        high = low + n_tensors
        for _ in tl.static_range(SEARCH_STEPS):
            middle = (low + high) // 2  # < high <= n_tensors
            right = tl.load(tensor_start_ptr + middle, mask=listed, other=0) <= index
            low = tl.where(right, middle, low)
            high = tl.where(right, high, middle)
        address = tl.load(param_addresses_ptr + low, mask=listed, other=0)
        first = tl.load(tensor_start_ptr + low, mask=listed, other=0)
        entries = address.to(tl.pointer_type(param_ptr.dtype.element_ty)) + (index - first)
    else:
        entries = param_ptr + index
    param = tl.load(entries, mask=listed)
    threshold = tl.load(thresholds_ptr + block, mask=listed, other=0)
    selected = tl.abs(exp_avg).to(tl.int32, bitcast=True) >= threshold
    # the arithmetic of _masked_adamw_kernel: an entry updates alike, deferred or not
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    updated = param * tl.where(selected, decay_selected, decay_unselected)
    updated = updated + tl.div_rn(-step_size * tl.where(selected, exp_avg, 0.0), denom)
    tl.store(entries, updated, mask=listed)


def _apply_deferred_triton(
    param: Shard, deferred: DeferredEntries, thresholds: torch.Tensor, scalars: AdamWScalars
) -> None:
    """One launch over the list's slots; the count stays on the device (no host sync)."""
    count = deferred.count
    if count is None:
        count = torch.full((1,), deferred.index.numel(), dtype=torch.int64, device=param.device)
    corrections = scalars.block_tensor(param.device)
    pointer, addresses = triton_buffer(param)
    n_tensors = 1 if isinstance(param, torch.Tensor) else len(param.tensors)
    tensor_start = count if isinstance(param, torch.Tensor) else device_starts(param)
    _apply_deferred_kernel[(-(-deferred.index.numel() // APPLY_SLOTS),)](
        pointer,
        deferred.index,
        deferred.block,
        deferred.exp_avg,
        deferred.exp_avg_sq,
        count,
        thresholds,
        pointer
        if corrections is None
        else corrections,  # (a valid fp32 pointer PER_COUNTER=False never reads)
        tensor_start,  # (LIST only: else a valid pointer never read)
        count if addresses is None else addresses,
        n_tensors,
        *scalars.kernel_arguments(),
        PER_COUNTER=corrections is not None,
        LIST=addresses is not None,
        SEARCH_STEPS=n_tensors.bit_length(),
        SLOTS=APPLY_SLOTS,
        **LAUNCH_OPTIONS,
    )


def _masked_adamw_cpu(
    param: Shard,
    exp_avg: Shard,
    exp_avg_sq: Shard,
    table: SegmentTable,
    tiles: TileTable,
    thresholds: torch.Tensor,
    scalars: AdamWScalars,
    defer_prefix: torch.Tensor | None,
) -> DeferredEntries | None:
    deferred = cpu_ops().masked_adamw(
        param=kernel_tensors(param),
        exp_avg=kernel_tensors(exp_avg),
        exp_avg_sq=kernel_tensors(exp_avg_sq),
        segments=segment_columns(table, param),
        tile_segment=tiles.tile_segment,
        tile_start=tiles.tile_start,
        tile_size=tiles.tile_size,
        thresholds=addressable(thresholds, tiles.tile_start),
        defer_prefix=None if defer_prefix is None else addressable(defer_prefix, tiles.tile_start),
        defer_shift=DEFER_SHIFT,
        corrections=scalars.counter_tensor(param.device),
        **scalars.kernel_keywords(),
    )
    return None if defer_prefix is None else DeferredEntries(*deferred)


def masked_adamw(
    param: Shard,
    exp_avg: Shard,
    exp_avg_sq: Shard,
    table: SegmentTable,
    thresholds: torch.Tensor,
    scalars: AdamWScalars,
    *,
    defer_prefix: torch.Tensor | None = None,
    defer_capacity: int = 0,
    backend: str = "torch",
) -> DeferredEntries | None:
    """Apply the update to `param` in place on segment elements only (m and v are read only).

    thresholds: int64 [n_blocks], RadixState.threshold once every block is resolved.
    defer_prefix: int64 [n_blocks], bits >> DEFER_SHIFT of the entries to leave for
    `apply_deferred` (NO_DEFERRAL: none); returns those entries (None without defer_prefix).
    defer_capacity: at least the number of entries that can defer here (RuntimeError if more
    did; on CUDA a device-side assert, since the count is never read on the host); the Triton
    kernel reserves this many slots and returns them all, with the count (DeferredEntries.count).
    """
    device = param.device
    check_backend("masked_adamw", backend, device)
    require_flat("masked_adamw", backend, param, exp_avg, exp_avg_sq)
    if backend == "torch":
        deferred = masked_adamw_reference(
            param, exp_avg, exp_avg_sq, table, thresholds, scalars, defer_prefix
        )
    else:
        if backend == "cpu":
            tiles, num_warps = tile_table(table, CPU_TILE), 0
        else:
            tiles, num_warps = triton_tiles(table, "masked_adamw")
        check_buffers(
            "masked_adamw", tiles, backend=backend, param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq
        )
        check_block_tensor("masked_adamw", "thresholds", thresholds, table, device)
        if defer_prefix is not None:
            check_block_tensor("masked_adamw", "defer_prefix", defer_prefix, table, device)
        if backend == "triton":
            return _masked_adamw_triton(
                param,
                exp_avg,
                exp_avg_sq,
                table,
                tiles,
                thresholds,
                scalars,
                defer_prefix,
                defer_capacity,
                num_warps=num_warps,
            )
        deferred = _masked_adamw_cpu(
            param, exp_avg, exp_avg_sq, table, tiles, thresholds, scalars, defer_prefix
        )
    if deferred is not None:
        _check_deferred_count(deferred.index.numel(), defer_capacity)
    return deferred


def _check_deferred_count(count: int, capacity: int) -> None:
    if count > capacity:
        raise RuntimeError(
            f"masked_adamw: {count} entries deferred, more than defer_capacity={capacity} (a caller's "
            "bound that is too small: the entries beyond it kept their p)"
        )
