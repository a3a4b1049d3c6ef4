"""`abs_histogram`: the refinement levels' |m| histograms of every backend against the reference.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import pytest
import torch
from dsforget.kernels import DENSE, NUM_LEVELS, abs_histogram, level_bins
from dsforget.kernels.radix import LEVELS, RESOLVED, abs_bits
from helpers import LAYOUTS, Shard, assert_bitwise, build_shard, fused_backends, random_state


def data_prefixes(exp_avg: torch.Tensor, shard: Shard, level: int) -> torch.Tensor:
    """Prefixes for `level` taken from actual entries (so counts are non-zero); block 1 RESOLVED."""
    shift, width = LEVELS[level]
    prefix = torch.zeros(shard.table.num_blocks, dtype=torch.int64)
    for shard_offset, length, _, _, block, _ in shard.table.rows():
        if block != DENSE and length > 0 and level > 0:
            entry = abs_bits(exp_avg[shard_offset + length // 2 : shard_offset + length // 2 + 1]).cpu()
            prefix[block] = int(entry) >> (shift + width)
    prefix[1] = RESOLVED
    return prefix.to(exp_avg.device)


@pytest.mark.parametrize("level", range(NUM_LEVELS))
@pytest.mark.parametrize(("backend", "device", "size"), fused_backends(include_large=True))
def test_abs_histogram_matches_reference(backend, device, size, level):
    """Catches a wrong digit shift or prefix comparison, resolved or DENSE blocks still counted,
    counts lost when several threads or tiles of one block flush, and level 0 mishandled."""
    shard = build_shard(LAYOUTS[size], device, seed=3)
    state = random_state(shard, seed=4)
    # duplicates: the same |m| with both signs must land in one bin
    exp_avg, covered = state["exp_avg"], shard.covered.nonzero().flatten()
    originals, copies = covered[::9], covered[1::9]
    exp_avg[copies] = -exp_avg[originals[: len(copies)]]
    before = exp_avg.clone()
    prefix = data_prefixes(exp_avg, shard, level)
    bins = level_bins(level)
    expected = torch.zeros(shard.table.num_blocks, bins, dtype=torch.int64, device=device)
    actual = torch.zeros_like(expected)
    abs_histogram(exp_avg, shard.table, prefix, level, expected, backend="torch")
    abs_histogram(exp_avg, shard.table, prefix, level, actual, backend=backend)
    assert int(expected.sum()) > 0, "test is vacuous: no entry matches the prefixes"
    assert_bitwise(actual, expected, f"level-{level} histogram")
    assert_bitwise(exp_avg, before, "exp_avg (read only)")


@pytest.mark.parametrize("level", range(NUM_LEVELS))
@pytest.mark.parametrize(("backend", "device", "size"), fused_backends(include_large=True))
def test_abs_histogram_of_blocks_that_are_mostly_exact_zeros(backend, device, size, level):
    """Catches per-tile counts that lose entries when one bin holds nearly a whole tile (90% of
    the entries exact zeros, +0 and -0, as embedding rows of unseen tokens): the zero bin's count
    is merged once per tile, and it must still equal the reference's, at the prefix of zero."""
    shard = build_shard(LAYOUTS[size], device, seed=7)
    state = random_state(shard, seed=8)
    exp_avg, covered = state["exp_avg"], shard.covered.nonzero().flatten()
    generator = torch.Generator().manual_seed(9)
    zeros = covered[torch.rand(len(covered), generator=generator) < 0.9]
    exp_avg[zeros] = 0.0
    exp_avg[zeros[::2]] = -0.0
    prefix = torch.zeros(shard.table.num_blocks, dtype=torch.int64, device=device)  # the prefix of |m| = 0
    expected = torch.zeros(shard.table.num_blocks, level_bins(level), dtype=torch.int64, device=device)
    actual = torch.zeros_like(expected)
    abs_histogram(exp_avg, shard.table, prefix, level, expected, backend="torch")
    abs_histogram(exp_avg, shard.table, prefix, level, actual, backend=backend)
    counted_zeros, counted = int(expected[:, 0].sum()), int(expected.sum())
    assert counted_zeros >= 0.8 * counted > 0, "test is vacuous: the zeros were not counted"
    assert_bitwise(actual, expected, f"level-{level} histogram of mostly-zero blocks")
