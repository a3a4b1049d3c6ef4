"""ShardLayout on its own: the data the optimizer steps by, checked when it is built."""

from __future__ import annotations

import pytest

from dsforget.optim.layout import Segment, ShardLayout


def test_layout_rejects_overlaps_and_out_of_range_segments() -> None:
    group = (("a", 10), ("b", 4))
    ShardLayout(12, (Segment("a", 3, 0, 7, 5), Segment("b", 0, 7, 4, 2)), group)
    with pytest.raises(ValueError, match="overlaps"):
        ShardLayout(12, (Segment("a", 3, 0, 7, 5), Segment("b", 0, 6, 4, 2)), group)
    with pytest.raises(ValueError, match="past the 12-element shard"):
        ShardLayout(12, (Segment("a", 0, 5, 10, 5),), group)
    with pytest.raises(ValueError, match="outside its parameter"):
        ShardLayout(12, (Segment("b", 2, 0, 4, 2),), group)


def test_whole_parameter_is_one_segment_with_its_row_length() -> None:
    """No ZeRO: a parameter is its own shard; catches a lost row length (row scales need it) and
    an empty parameter given a zero-length segment, which the layout itself refuses."""
    layout = ShardLayout.whole("w", (3, 5))
    assert layout.numel == 15
    assert layout.segments == (Segment("w", 0, 0, 15, 5),)
    assert layout.group_params == (("w", 15),)
    empty = ShardLayout.whole("e", (0, 4))
    assert empty.numel == 0 and empty.segments == ()


def test_segments_may_come_in_any_order_but_never_empty() -> None:
    group = (("a", 10), ("b", 4))
    ShardLayout(14, (Segment("b", 0, 10, 4, 2), Segment("a", 0, 0, 10, 5)), group)
    with pytest.raises(ValueError, match="is empty or overlaps"):
        ShardLayout(14, (Segment("a", 0, 0, 0, 5),), group)
