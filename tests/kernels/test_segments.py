"""Segment tables: malformed tables refused before any kernel writes, `split_at_spans`.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import pytest
import torch
from dsforget.kernels import NO_ROWSCALE, SegmentTable, update_moments
from helpers import BETA1, BETA2, SMALL_LAYOUT, assert_bitwise, build_shard


@pytest.mark.parametrize(
    ("rows", "numel", "problem"),
    [
        ([(0, 50, 0, 1, 0, NO_ROWSCALE), (40, 20, 0, 1, 0, NO_ROWSCALE)], 100, "overlap"),
        ([(90, 20, 0, 1, 0, NO_ROWSCALE)], 100, "reaches element 110"),
        ([(0, 50, 0, 0, 0, NO_ROWSCALE)], 100, "row_len >= 1"),
        ([(0, 50, 0, 1, 3, NO_ROWSCALE)], 100, "block must be DENSE"),
        ([(0, 50, 0, 10, 0, 0)], 100, "row scales beyond"),
    ],
    ids=["overlap", "past-the-end", "row-len-0", "unknown-block", "rowscale-short"],
)
def test_malformed_tables_are_refused_before_any_write(rows, numel, problem):
    """Catches kernels writing out of bounds or racing on shared elements: the fused backends
    index raw memory, so a bad table must raise before they run, and leave the state intact."""
    table = SegmentTable.build(rows, torch.ones(3), [10])
    exp_avg = torch.randn(numel)
    before = exp_avg.clone()
    with pytest.raises(ValueError, match=problem):
        update_moments(
            torch.randn(numel), exp_avg, torch.rand(numel), table, beta1=BETA1, beta2=BETA2, backend="cpu"
        )
    assert_bitwise(exp_avg, before, "exp_avg")


def test_split_at_spans_keeps_every_element_once():
    """Catches lost or doubled elements and wrong parameter offsets when a table is cut at the
    untouched spans of a speculative update."""
    shard = build_shard(SMALL_LAYOUT, "cpu")
    spans = [(0, 4), (20, 1040), (1100, 1101), (1500, 2500), (3200, 3300)]
    inside, outside = shard.table.split_at_spans(spans)
    element_of = {}  # shard element -> (parameter offset, row_len, block, rowscale_start)
    for shard_offset, length, param_offset, row_len, block, rowscale_start in shard.table.rows():
        for j in range(length):
            element_of[shard_offset + j] = (param_offset + j, row_len, block, rowscale_start)
    seen: dict[int, bool] = {}
    for table, within in ((inside, True), (outside, False)):
        assert torch.equal(table.block_k, shard.table.block_k)
        for shard_offset, length, param_offset, row_len, block, rowscale_start in table.rows():
            for j in range(length):
                element = shard_offset + j
                assert element not in seen, f"element {element} twice"
                seen[element] = within
                assert element_of[element] == (param_offset + j, row_len, block, rowscale_start)
                assert any(first <= element < last for first, last in spans) == within, element
    assert sorted(seen) == sorted(element_of)
    assert any(seen.values()) and not all(seen.values())
