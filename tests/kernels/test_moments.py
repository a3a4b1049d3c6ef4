"""`update_moments`: m, v, the level-0 histogram and the hinted window counts of every backend
against the reference.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import pytest
import torch
from dsforget.kernels import DENSE, level_bins, update_moments
from dsforget.kernels.moments import HINT_SHIFT, HINT_WINDOW, HintedCounts
from dsforget.kernels.radix import abs_bits, digit_and_prefix
from helpers import (
    BETA1,
    BETA2,
    LAYOUTS,
    assert_bitwise,
    assert_close,
    assert_padding_untouched,
    build_shard,
    clone,
    fused_backends,
    random_state,
)


@pytest.mark.parametrize("with_histogram", [True, False], ids=["histogram", "no-histogram"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32-grad", "bf16-grad"])
@pytest.mark.parametrize(("backend", "device", "size"), fused_backends(include_large=True))
def test_update_moments_matches_reference(backend, device, size, grad_dtype, with_histogram):
    """Catches wrong lerp/v formulas, row scales applied from the wrong row (mid-row segment
    starts, tiles spanning rows), bf16 gradients read as fp32, histogram counts lost or doubled
    when tiles, threads or segments of one block meet, DENSE segments counted, and writes into
    padding or the gradient."""
    shard = build_shard(LAYOUTS[size], device, seed=1)
    before = random_state(shard, seed=2, grad_dtype=grad_dtype)
    expected, actual = clone(before), clone(before)
    bins = level_bins(0)
    histograms = [
        torch.zeros(shard.table.num_blocks, bins, dtype=torch.int64, device=device)
        if with_histogram
        else None
        for _ in range(2)
    ]
    for state, histogram, name in zip((expected, actual), histograms, ("torch", backend), strict=True):
        update_moments(
            state["grad"],
            state["exp_avg"],
            state["exp_avg_sq"],
            shard.table,
            beta1=BETA1,
            beta2=BETA2,
            histogram=histogram,
            backend=name,
        )
    covered = shard.covered
    assert (actual["exp_avg"] != before["exp_avg"])[covered].float().mean() > 0.99, "m barely changed"
    assert_close(actual["exp_avg"][covered], expected["exp_avg"][covered], "exp_avg")
    assert_close(actual["exp_avg_sq"][covered], expected["exp_avg_sq"][covered], "exp_avg_sq")
    assert_bitwise(actual["grad"], before["grad"], "grad (read only)")
    assert_bitwise(actual["param"], before["param"], "param (not an input)")
    assert_padding_untouched(actual, before, shard)
    if with_histogram:
        # exact counts of the backend's own m (its m may differ from the reference's by an ulp)
        own = torch.zeros_like(histograms[1])
        for shard_offset, length, _, _, block, _ in shard.table.rows():
            if block != DENSE:
                digit, _ = digit_and_prefix(
                    abs_bits(actual["exp_avg"][shard_offset : shard_offset + length]), 0
                )
                own[block] += torch.bincount(digit, minlength=bins)
        assert_bitwise(histograms[1], own, "level-0 histogram")
        assert int(histograms[1].sum()) == sum(r[1] for r in shard.table.rows() if r[4] != DENSE)


def hinted_update(state: dict, table, start: torch.Tensor, width: torch.Tensor, backend: str):
    """`update_moments` on `state` with the level-0 histogram and windows (start, width); returns
    (histogram, HintedCounts)."""
    device = start.device
    histogram = torch.zeros(table.num_blocks, level_bins(0), dtype=torch.int64, device=device)
    hinted = HintedCounts(
        start,
        width,
        torch.zeros_like(start),
        torch.zeros(table.num_blocks, HINT_WINDOW, dtype=torch.int64, device=device),
    )
    update_moments(
        state["grad"],
        state["exp_avg"],
        state["exp_avg_sq"],
        table,
        beta1=BETA1,
        beta2=BETA2,
        histogram=histogram,
        hinted=hinted,
        backend=backend,
    )
    return histogram, hinted


def assert_counts_of_own_m(
    exp_avg: torch.Tensor, table, histogram: torch.Tensor, hinted: HintedCounts
) -> None:
    """The counts `hinted_update` made equal those recounted from the m it wrote, bit for bit."""
    own_histogram, own_above, own_window = (
        torch.zeros_like(t) for t in (histogram, hinted.above, hinted.histogram)
    )
    starts, widths = hinted.start.tolist(), hinted.width.tolist()
    for shard_offset, length, _, _, block, _ in table.rows():
        if block == DENSE:
            continue
        bits = abs_bits(exp_avg[shard_offset : shard_offset + length])
        if starts[block] < 0:
            own_histogram[block] += torch.bincount(digit_and_prefix(bits, 0)[0], minlength=level_bins(0))
            continue
        position = (bits >> HINT_SHIFT) - starts[block]  # in the window: 0 .. width - 1
        own_above[block] += int((position >= widths[block]).sum())
        inside = position[(position >= 0) & (position < widths[block])]
        own_window[block] += torch.bincount(inside, minlength=HINT_WINDOW)
    assert int(own_window.sum()) > 0 and int(own_histogram.sum()) > 0, "the counts must be populated"
    assert_bitwise(histogram, own_histogram, "level-0 histogram (unhinted blocks only)")
    assert_bitwise(hinted.above, own_above, "entries above the window")
    assert_bitwise(hinted.histogram, own_window, "histogram of the window")


@pytest.mark.parametrize(("backend", "device", "size"), fused_backends(include_large=True))
def test_hinted_counts_match_the_backends_own_m(backend, device, size):
    """Catches hinted counting that loses or doubles entries (pieces inside tiles, threads,
    several segments of one block), counts the window one prefix off at either end, counts
    'above' from inside the window, or still fills the level-0 histogram of a hinted block."""
    shard = build_shard(LAYOUTS[size], device, seed=5)
    state = random_state(shard, seed=6)
    table = shard.table
    # a window around one of each block's own entries (populated); block 1 has none
    # (widths differ by block, the widest included)
    start = torch.full((table.num_blocks,), -1, dtype=torch.int64)
    width = HINT_WINDOW - 3 * torch.arange(table.num_blocks, dtype=torch.int64)
    for shard_offset, length, _, _, block, _ in table.rows():
        if block != DENSE and block != 1 and length > 0:
            prefix = int(abs_bits(state["exp_avg"][shard_offset].reshape(1)).item()) >> HINT_SHIFT
            start[block] = prefix - int(width[block]) // 2
    histogram, hinted = hinted_update(state, table, start.to(device), width.to(device), backend)
    assert int(hinted.above.sum()) > 0, "the windows must have entries above them"
    assert_counts_of_own_m(state["exp_avg"], table, histogram, hinted)


@pytest.mark.parametrize(("backend", "device", "size"), fused_backends(include_large=True))
def test_counts_of_blocks_that_are_mostly_exact_zeros(backend, device, size):
    """Catches per-tile counts that lose entries when one bin holds nearly a whole tile: 90% of
    m and g exact zeros (m stays 0), counted into the level-0 histogram (block 1) and into windows
    that start at prefix 0, where a threshold of exactly 0 puts them (the other blocks); counts
    are checked against the backend's own m (m itself against the reference in the test above)."""
    shard = build_shard(LAYOUTS[size], device, seed=11)
    state = random_state(shard, seed=12)
    covered = shard.covered.nonzero().flatten()
    zeros = covered[torch.rand(len(covered), generator=torch.Generator().manual_seed(13)) < 0.9]
    state["exp_avg"][zeros] = 0.0
    state["grad"][zeros] = 0.0
    start = torch.zeros(shard.table.num_blocks, dtype=torch.int64, device=device)
    start[1] = -1
    histogram, hinted = hinted_update(state, shard.table, start, torch.full_like(start, 64), backend)
    assert int((state["exp_avg"][zeros] == 0).sum()) == len(zeros) > 0, "the zeros must stay exact zeros"
    assert int(histogram[1, 0]) > 0 and int(hinted.histogram[:, 0].sum()) > 0, (
        "test is vacuous: no zero counted"
    )
    assert_counts_of_own_m(state["exp_avg"], shard.table, histogram, hinted)
