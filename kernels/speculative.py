"""Fused op 4 (CPU): the whole MoFO step in one pass over the shard, speculating on the threshold.

The two-pass step (moments, then the masked update once the threshold is exact) reads 24 B per
element: g, m, v, then p, m, v. On a CPU whose memory time goes to reads, that is ~1.5x the 16 B
of one AdamW pass however well each pass runs. A block's threshold moves little from one step
to the next, and the moments pass already counts a window of |m| around where it is expected
(`ThresholdHint`). This op therefore applies the update in the same pass, as if the threshold
lay inside the window, and keeps what it needs to make the result exact whatever it turns out
to be:

- entries above the window: updated as selected. If the update cannot be undone bit for bit
  (`p_new - step` does not give back the unselected p, where the update moves p across a power
  of two or is large against p: ~2% of the selected entries in the benchmark, at lr 1e-3), the
  unselected p is listed (the rollbacks);
- entries inside the window (~0.3-1% of a block): updated as unselected and listed with m, v
  and that p (like the two-pass step's last bin); `resolve_window` adds the step to those that
  turn out selected, writing p without reading it (the entries are scattered: a read is a cache
  miss each);
- entries below the window: updated as unselected (decayed only);
- DENSE segments: updated.

A block whose exact threshold lies in its window (a hit, almost every step once the windows
settle) is then done: one pass, 16 B read and 12 B written per element, AdamW's traffic. A
block that missed takes `correct_speculation`: a pass over its entries outside the window that
adds the step where it was wrongly left out and subtracts it where it was wrongly applied, then
puts back the listed unselected values. Every path gives the two-pass step's result bit for bit
(tested), so speculation changes the work a step does, never its result.

Memory: each block has a region of 1 / LISTED_SHARE of its local entries (at least LISTED_MIN)
in buffers kept per table (`list_buffers`) for its window entries (28 B each: index, block, m,
v, p) and as many for rollbacks (20 B), i.e. ~0.75 B per element of the shard. A piece of a block
whose entries do not fit (ties: a block of equal |m| has all of it in the window) is left
untouched, as is the rest of that thread's range of the block's pieces; the untouched spans are
returned and take the two-pass update (`masked_adamw`) once the threshold is exact. Which pieces
those are depends on the threads' timing; the result does not.

A block whose threshold was 0 (fewer nonzero |m| than k, e.g. mostly exact zeros) has an empty
window at 0 (`ThresholdHint`): every entry is updated as selected and none is listed as a window
entry (only its rollbacks, should the block leave 0). The op also counts each block's nonzero
|m|; if it is still below k, the block is resolved at 0 from that count, and nothing is counted
over m or corrected for it.

Preconditions (checked by the caller, `topk_adamw_step`): selected and unselected entries decay
alike (weight-decay scope "all", or no weight decay), and every top-k block has a window. Only
the "cpu" backend implements this op.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ._cpu import cpu_ops
from .masked_update import CPU_TILE, AdamWScalars, DeferredEntries
from .moments import HINT_SHIFT, HINT_WINDOW, HintedCounts
from .segments import SegmentTable
from .tiles import (
    Shard,
    check_block_tensor,
    check_buffers,
    kernel_tensors,
    segment_columns,
    shard_starts,
    tile_table,
)

# A block's lists hold at most 1 / LISTED_SHARE of its entries on this rank (at least LISTED_MIN):
# its window entries (0.3-1% of a block once the windows settle, up to ~6% at their widest, right
# after a cold start), and as many rollbacks (~0.4% at 16 Mi in the benchmark, lr 1e-3).
LISTED_SHARE = 64
LISTED_MIN = 1024


@dataclass(frozen=True)
class SpeculationLeftovers:
    """What the one-pass update leaves for the rest of the step.

    deferred: the window entries, by block, in no particular order within a block, and
    deferred_unselected: fp32 [D], their p as written (unselected; `resolve_window`).
    rollback_index, rollback_block: int64 [R], rollback_unselected: fp32 [R], the entries updated as
    selected whose unselected p cannot be recomputed from the new one (p if they are not).
    untouched: int64 [U, 2], ascending shard spans [first, last) whose p this op did not write.
    """

    deferred: DeferredEntries
    deferred_unselected: torch.Tensor
    rollback_index: torch.Tensor
    rollback_block: torch.Tensor
    rollback_unselected: torch.Tensor
    untouched: torch.Tensor

    def untouched_spans(self) -> list[tuple[int, int]]:
        return [(int(first), int(last)) for first, last in self.untouched.tolist()]


@dataclass(frozen=True)
class ListBuffers:
    """Where the update lists entries, kept per table between steps (fresh buffers would cost
    their page faults every step: ~2 ms at 16 Mi elements). Block b owns the slots
    [region_start[b], region_start[b] + region_size[b]) of every array; the op then moves the
    entries to the front."""

    region_start: torch.Tensor
    region_size: torch.Tensor
    arrays: tuple[torch.Tensor, ...]  # window index, block, m, v, unselected p; rollback index, block, p


_BUFFERS: dict[tuple[int, int, int], ListBuffers] = {}


def list_buffers(table: SegmentTable) -> ListBuffers:
    """The (cached) list buffers of `table`: a block's region holds 1 / LISTED_SHARE of its
    entries in the table, at least LISTED_MIN, at most all of them."""
    key = (id(table), LISTED_SHARE, LISTED_MIN)
    buffers = _BUFFERS.get(key)
    if buffers is None:
        local = torch.zeros(table.num_blocks, dtype=torch.int64)
        topk = table.block >= 0
        local.index_add_(0, table.block[topk].cpu(), table.length[topk].cpu())
        # (never more slots than entries: a block cannot list more)
        size = torch.minimum(torch.clamp(local // LISTED_SHARE, min=LISTED_MIN), local)
        slots = int(size.sum())
        device = table.length.device
        arrays = tuple(
            torch.empty(slots, dtype=dtype, device=device)
            for dtype in (torch.int64, torch.int64, torch.float32, torch.float32, torch.float32)
            + (torch.int64, torch.int64, torch.float32)
        )
        start = torch.cumsum(size, 0) - size
        buffers = ListBuffers(start.to(device), size.to(device), arrays)
        _BUFFERS[key] = buffers
        weakref.finalize(table, _BUFFERS.pop, key, None)
    return buffers


def speculative_update(
    grad: Shard,
    param: Shard,
    exp_avg: Shard,
    exp_avg_sq: Shard,
    table: SegmentTable,
    hinted: HintedCounts,
    scalars: AdamWScalars,
    *,
    beta1: float,
    beta2: float,
    nonzero: torch.Tensor | None = None,
) -> SpeculationLeftovers:
    """Moments, window counts (into hinted.above and hinted.histogram) and nonzero |m| counts
    (into `nonzero`, if given), as `update_moments`, and the speculative update, in one pass (see
    the module docstring); CPU tensors only. The lists it returns live in the table's list
    buffers: valid until the next call for the table."""
    tiles = tile_table(table, CPU_TILE)
    check_buffers("speculative_update", tiles, grad, param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    device = param.device
    for name in ("start", "width", "above"):
        check_block_tensor("speculative_update", f"window {name}", getattr(hinted, name), table, device)
    check_block_tensor("speculative_update", "window histogram", hinted.histogram, table, device, HINT_WINDOW)
    if nonzero is not None:
        check_block_tensor("speculative_update", "nonzero", nonzero, table, device)
    buffers = list_buffers(table)
    counts, untouched = cpu_ops().speculative_update(
        grad=kernel_tensors(grad),
        param=kernel_tensors(param),
        exp_avg=kernel_tensors(exp_avg),
        exp_avg_sq=kernel_tensors(exp_avg_sq),
        segments=segment_columns(table, param),
        rowscale=table.rowscale,
        tile_segment=tiles.tile_segment,
        tile_start=tiles.tile_start,
        tile_size=tiles.tile_size,
        window_start=hinted.start,
        window_width=hinted.width,
        hint_above=hinted.above,
        hint_histogram=hinted.histogram,
        hint_bins=HINT_WINDOW,
        hint_shift=HINT_SHIFT,
        nonzero=nonzero,
        beta1=beta1,
        beta2=beta2,
        corrections=scalars.counter_tensor(device),
        **scalars.kernel_keywords(),
        region_start=buffers.region_start,
        region_size=buffers.region_size,
        buffers=list(buffers.arrays),
    )
    deferred, rollbacks = counts.tolist()
    lists = [array[:deferred] for array in buffers.arrays[:5]] + [
        array[:rollbacks] for array in buffers.arrays[5:]
    ]
    return SpeculationLeftovers(DeferredEntries(*lists[:4]), *lists[4:], untouched)


def correct_speculation(
    param: Shard,
    exp_avg: Shard,
    exp_avg_sq: Shard,
    speculated: SegmentTable,
    thresholds: torch.Tensor,
    hinted: HintedCounts,
    left: SpeculationLeftovers,
    scalars: AdamWScalars,
) -> None:
    """Make the speculated entries of `speculated` (the table without the untouched spans) exact
    for the blocks whose `thresholds` lie outside their windows; CPU tensors only."""
    tiles = tile_table(speculated, CPU_TILE)
    check_buffers("correct_speculation", tiles, param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    check_block_tensor("correct_speculation", "thresholds", thresholds, speculated, param.device)
    cpu_ops().correct_speculation(
        param=kernel_tensors(param),
        exp_avg=kernel_tensors(exp_avg),
        exp_avg_sq=kernel_tensors(exp_avg_sq),
        segments=segment_columns(speculated, param),
        tile_segment=tiles.tile_segment,
        tile_start=tiles.tile_start,
        tile_size=tiles.tile_size,
        thresholds=thresholds,
        window_start=hinted.start,
        window_width=hinted.width,
        hint_bins=HINT_WINDOW,
        hint_shift=HINT_SHIFT,
        rollback_index=left.rollback_index,
        rollback_block=left.rollback_block,
        rollback_unselected=left.rollback_unselected,
        corrections=scalars.counter_tensor(param.device),
        **scalars.kernel_keywords(),
    )


def resolve_window(
    param: Shard, left: SpeculationLeftovers, thresholds: torch.Tensor, scalars: AdamWScalars
) -> None:
    """Finish the window entries the update listed, now that `thresholds` are exact; CPU only."""
    deferred = left.deferred
    cpu_ops().resolve_window(
        param=kernel_tensors(param),
        tensor_starts=shard_starts(param),
        index=deferred.index,
        block=deferred.block,
        exp_avg=deferred.exp_avg,
        exp_avg_sq=deferred.exp_avg_sq,
        unselected=left.deferred_unselected,
        thresholds=thresholds,
        block_corrections=scalars.block_tensor(param.device),
        **scalars.kernel_keywords(),
    )
