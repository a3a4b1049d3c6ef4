"""One masked AdamW step on a flat shard with exact per-block top-k thresholds, from the fused ops.

The work, in the order it runs (`sum_over_ranks` is the all-reduce of exact mode; every branch
below depends only on summed counts, so all ranks take the same branches and call it equally
often):

1. `update_moments`: m, v, and counts of |m|: the level-0 histogram, or for a block with a
   hint (a window of level-1 prefixes around where its threshold is expected, see ThresholdHint)
   the entries above the window and the histogram of the window (see moments.py); and every
   block's count of nonzero |m|;
2. a block with fewer nonzero |m| than k has the threshold 0 (its k-th largest |m| is a zero;
   ties at the threshold are all selected, so every entry is): it is resolved at once
   (`resolve_at_zero`) and counts nothing more, however many zeros it holds (embedding rows of
   tokens never seen). Summed over ranks with the other counts, so every rank resolves it;
3. a block whose threshold fell into its window takes levels 0 and 1 from those counts; any
   other block pays a histogram pass over m (`abs_histogram`) for each level it lacks;
4. a block still unresolved has narrowed its threshold to one level-2 bin (a few entries in 10^5
   of the block). The update leaves that bin's entries and lists them; the level-2 histogram of
   the list fixes the threshold and `apply_deferred` updates them. A bin of more than
   DEFER_LIMIT entries (ties at a threshold above 0) takes a level-2 pass over m before the
   update instead.

With hits, the step reads and writes 36 B per element (moments 20, update 16) instead of the 44 B
of three passes over m before the update, and reads the host once (`_open_bins`: whether a window
missed, whether a bin holds too many entries to defer, how many to defer): thresholds, counts and
the deferred list stay on the device (on the Triton backend its length too). A step without a
hint, one whose window missed and one with a bin past DEFER_LIMIT read it a few times more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .hints import ThresholdHint
from .histogram import abs_histogram, deferred_histogram
from .masked_update import DEFER_SHIFT, AdamWScalars, apply_deferred, masked_adamw
from .moments import HINT_WINDOW, HintedCounts, update_moments
from .radix import RESOLVED, RadixState, advance_within, level_bins, refine, resolve_at_zero
from .segments import SegmentTable
from .speculative import correct_speculation, resolve_window, speculative_update
from .tiles import Shard

# Most entries one block may defer: a bin beyond it takes a pass over m instead, so the list never
# outgrows 16 level-2 histograms' worth of entries per block (O(blocks x bins), never O(shard)).
DEFER_LIMIT = 16 * level_bins(2)

SumOverRanks = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _counts(table: SegmentTable, *bins: int) -> torch.Tensor:
    """Zeroed int64 counts [n_blocks, *bins] on the table's device."""
    return torch.zeros(table.num_blocks, *bins, dtype=torch.int64, device=table.length.device)


def no_reduction(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`sum_over_ranks` of a single process, or of top-k blocks local to each rank."""
    return tensors


def topk_adamw_step(
    param: Shard,
    grad: Shard,
    exp_avg: Shard,
    exp_avg_sq: Shard,
    table: SegmentTable,
    *,
    step: int | Sequence[int],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decay_selected_only: bool,
    hint: ThresholdHint | None = None,
    sum_over_ranks: SumOverRanks = no_reduction,
    backend: str = "torch",
    speculate: bool = True,
) -> ThresholdHint:
    """Update param, exp_avg and exp_avg_sq in place; returns the hint for the next step.

    param, grad, exp_avg, exp_avg_sq: flat shards, or on the fused backends four TensorLists of
    one `starts` (separate tensors seen as one shard: the multi-tensor step, tiles.TensorList).

    step: the 1-based step count after this one, or one such count per step counter: segment s
    is then bias-corrected by step[table.counter[s]] (its parameter's own count of moment
    updates; where all of the table's counters agree, the step is the single count's bit for bit).

    hint: the previous call's return value for this table, or None. It changes only the work
    done, never the result, but must be the same on every rank that sums histograms.
    speculate: take the one-pass step (speculative.py) where it applies: the "cpu" backend, a
    hint, and selected and unselected entries decaying alike. False forces the two-pass step
    (for comparisons); neither changes the result.
    """
    hyper = dict(
        lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decay_selected_only=decay_selected_only
    )
    if isinstance(step, int):
        update = AdamWScalars.at_step(step, **hyper)
    else:
        update = AdamWScalars.at_counts(step, table, **hyper)
    moments = {"beta1": betas[0], "beta2": betas[1], "backend": backend}
    if table.num_blocks == 0:
        update_moments(grad, exp_avg, exp_avg_sq, table, **moments)
        masked_adamw(param, exp_avg, exp_avg_sq, table, table.block_k, update, backend=backend)
        return ThresholdHint.after(table.block_k, None, backend)

    if speculate and hint is not None and backend == "cpu" and update.decay == update.decay_unselected:
        return _speculative_step(param, grad, exp_avg, exp_avg_sq, table, update, betas, hint, sum_over_ranks)

    radix = RadixState.start(table.block_k)
    nonzero = _counts(table)
    missed = None
    if hint is None:
        histogram = _counts(table, level_bins(0))
        update_moments(grad, exp_avg, exp_avg_sq, table, histogram=histogram, nonzero=nonzero, **moments)
        histogram, nonzero = sum_over_ranks([histogram, nonzero])
        resolve_at_zero(radix, nonzero)
        refine(radix, histogram, 0, backend=backend)
        _refine_by_pass(radix, exp_avg, table, 1, radix.unresolved, sum_over_ranks, backend)
    else:
        window = _counts(table, HINT_WINDOW)
        hinted = HintedCounts(hint.start, hint.width, torch.zeros_like(hint.start), window)
        update_moments(grad, exp_avg, exp_avg_sq, table, hinted=hinted, nonzero=nonzero, **moments)
        missed = _refine_in_window(radix, hinted, nonzero, sum_over_ranks, backend)
    any_missed, over_limit, capacity = _open_bins(radix, missed)
    if any_missed:
        _refine_missed(radix, missed, exp_avg, table, sum_over_ranks, backend)
        _, over_limit, capacity = _open_bins(radix, None)
    # a block still open has narrowed its threshold to one level-2 bin of `matching` entries
    # (over all ranks): counted over m if it holds too many (which resolves it), deferred otherwise
    if over_limit:
        crowded = radix.unresolved & (radix.matching > DEFER_LIMIT)
        _refine_by_pass(radix, exp_avg, table, 2, crowded, sum_over_ranks, backend)
    defer = radix.unresolved  # (a level-2 pass over m resolves every block it counts)
    if capacity == 0:
        masked_adamw(param, exp_avg, exp_avg_sq, table, radix.threshold, update, backend=backend)
        return ThresholdHint.after(radix.threshold, hint, backend)

    # entries above the bin are selected now; the bin's own wait for the exact threshold (a
    # resolved block's prefix is NO_DEFERRAL: radix.prefix names exactly the bins to defer)
    above_bin = (radix.prefix + 1) << DEFER_SHIFT
    deferred = masked_adamw(
        param,
        exp_avg,
        exp_avg_sq,
        table,
        torch.where(defer, above_bin, radix.threshold),
        update,
        defer_prefix=radix.prefix,
        defer_capacity=capacity,
        backend=backend,
    )
    assert deferred is not None
    histogram = _counts(table, level_bins(2))
    deferred_histogram(deferred, radix.prefix, 2, histogram, backend=backend)
    refine(radix, sum_over_ranks([histogram])[0], 2, backend=backend)
    apply_deferred(param, deferred, radix.threshold, update, backend=backend)
    return ThresholdHint.after(radix.threshold, hint, backend)


def _refine_by_pass(
    radix: RadixState,
    exp_avg: Shard,
    table: SegmentTable,
    level: int,
    blocks: torch.Tensor,
    sum_over_ranks: SumOverRanks,
    backend: str,
) -> None:
    """Refine `level` for `blocks` (a bool mask) from a histogram pass over m."""
    if not bool(blocks.any()):
        return
    histogram = _counts(table, level_bins(level))
    abs_histogram(
        exp_avg, table, torch.where(blocks, radix.prefix, RESOLVED), level, histogram, backend=backend
    )
    refine(radix, sum_over_ranks([histogram])[0], level, blocks=blocks, backend=backend)


def _refine_in_window(
    radix: RadixState,
    hinted: HintedCounts,
    nonzero: torch.Tensor,
    sum_over_ranks: SumOverRanks,
    backend: str,
) -> torch.Tensor:
    """Levels 0 and 1 from the moments pass's counts (every block has a window): a block with
    fewer nonzero |m| than k resolves at 0 whatever its window, one whose threshold fell into its
    window takes both levels from the window's counts; returns the open blocks the window missed
    (bool [n_blocks], on the device: nothing is read on the host here)."""
    above, in_window, nonzero = sum_over_ranks([hinted.above, hinted.histogram, nonzero])
    resolve_at_zero(radix, nonzero)
    hit = advance_within(radix, in_window, 1, hinted.start, above, backend=backend)
    return radix.unresolved & ~hit


def _open_bins(radix: RadixState, missed: torch.Tensor | None) -> tuple[bool, bool, int]:
    """The host sync of a step whose windows hit, its only one: three numbers read together.

    Whether an open block's window missed (`missed`, bool [n_blocks]; None: none did), whether an
    open block's level-2 bin holds more than DEFER_LIMIT entries (then counted over m before the
    update), and how many entries the other open blocks' bins hold: the deferral list's capacity,
    summed over ranks, so it bounds every rank's share (0: no block defers). The last two mean
    something only once no open block has missed.
    """
    over = radix.unresolved & (radix.matching > DEFER_LIMIT)
    capacity = torch.where(radix.unresolved & ~over, radix.matching, 0).sum()
    any_missed = capacity.new_zeros(()) if missed is None else missed.any().to(torch.int64)
    any_missed, any_over, capacity = torch.stack([any_missed, over.any().to(torch.int64), capacity]).tolist()
    return bool(any_missed), bool(any_over), capacity


def _refine_missed(
    radix: RadixState,
    missed: torch.Tensor,
    exp_avg: Shard,
    table: SegmentTable,
    sum_over_ranks: SumOverRanks,
    backend: str,
) -> None:
    """Levels 0 and 1 over m for the open blocks their window missed (`missed`, a bool mask)."""
    _refine_by_pass(radix, exp_avg, table, 0, missed, sum_over_ranks, backend)
    _refine_by_pass(radix, exp_avg, table, 1, radix.unresolved & missed, sum_over_ranks, backend)


def _speculative_step(
    param: Shard,
    grad: Shard,
    exp_avg: Shard,
    exp_avg_sq: Shard,
    table: SegmentTable,
    update: AdamWScalars,
    betas: tuple[float, float],
    hint: ThresholdHint,
    sum_over_ranks: SumOverRanks,
) -> ThresholdHint:
    """The step with the update applied in the moments pass (see speculative.py): the window
    counts fix levels 0 and 1 of a block that hit, the window entries listed by the pass its
    level 2; a block that missed is counted over m and corrected. A block resolved at 0 (fewer
    nonzero |m| than k) counts nothing; its entries above its window were updated as selected,
    those in it are listed, and if its window does not start at 0 (its threshold was not 0 last
    step), those below it are corrected."""
    backend = "cpu"  # (the only backend with the one-pass op)
    window = _counts(table, HINT_WINDOW)
    hinted = HintedCounts(hint.start, hint.width, torch.zeros_like(hint.start), window)
    nonzero = torch.zeros_like(hint.start)
    left = speculative_update(
        grad,
        param,
        exp_avg,
        exp_avg_sq,
        table,
        hinted,
        update,
        beta1=betas[0],
        beta2=betas[1],
        nonzero=nonzero,
    )
    untouched, speculated = (None, table)
    if left.untouched.numel() > 0:  # (this rank's own: no branch below that leads to a collective)
        untouched, speculated = table.split_at_spans(left.untouched_spans())

    radix = RadixState.start(table.block_k)
    above, in_window, nonzero = sum_over_ranks([hinted.above, hinted.histogram, nonzero])
    at_zero = resolve_at_zero(radix, nonzero)
    hit = advance_within(radix, in_window, 1, hinted.start, above, backend=backend)
    # every threshold in its window (a hit, or 0 in a window from 0): nothing to count over m
    # or correct
    missed = not bool((hit | (at_zero & (hinted.start == 0))).all())
    if missed:
        _refine_missed(radix, radix.unresolved & ~hit, exp_avg, table, sum_over_ranks, backend)
    if not radix.done:
        # an open block that hit has its level-2 bin in its window: the pass listed its entries
        # (but those of untouched spans); one that missed is counted over m
        histogram = _counts(table, level_bins(2))
        in_list = torch.where(hit, radix.prefix, RESOLVED)
        deferred_histogram(left.deferred, in_list, 2, histogram, backend=backend)
        if untouched is not None:
            abs_histogram(exp_avg, untouched, in_list, 2, histogram, backend=backend)
        over_m = torch.where(hit, RESOLVED, radix.prefix)
        if bool((over_m != RESOLVED).any()):
            abs_histogram(exp_avg, table, over_m, 2, histogram, backend=backend)
        refine(radix, sum_over_ranks([histogram])[0], 2, backend=backend)

    resolve_window(param, left, radix.threshold, update)
    if untouched is not None:
        masked_adamw(param, exp_avg, exp_avg_sq, untouched, radix.threshold, update, backend=backend)
    if missed:
        correct_speculation(param, exp_avg, exp_avg_sq, speculated, radix.threshold, hinted, left, update)
    return ThresholdHint.after(radix.threshold, hint, backend)
