"""The segment table: how the kernels see one flat fp32 shard.

A flat shard (a ZeRO partition, or a single parameter without ZeRO) holds pieces of several
parameters back to back. Each piece is a *segment*; elements of the shard that belong to no
segment (ZeRO alignment padding, frozen parameters) are never read or written.

The kernels know nothing about models or DeepSpeed: they see only these integer columns.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

DENSE = -1  # `block` value of a segment whose entries all update (no top-k)
NO_ROWSCALE = -1  # `rowscale_start` value of a segment whose gradient is not scaled


@dataclass(frozen=True)
class SegmentTable:
    """Columns of int64 tensors, one row per segment, on the shard's device.

    shard_offset[s]   first element of segment s in the flat shard
    length[s]         number of elements of segment s
    param_offset[s]   index of that first element inside its (flattened) parameter
    row_len[s]        elements per row of the parameter (1 for 1-D parameters); row of
                      shard element j is (param_offset[s] + j - shard_offset[s]) // row_len[s]
    block[s]          top-k block the segment belongs to, or DENSE
    rowscale_start[s] offset of the parameter's row scales in `rowscale`, or NO_ROWSCALE
    rowscale          float32 row scales of all rowscaled parameters, concatenated
    block_k           int64 [n_blocks]: entries to select in each block (k of top-k)
    """

    shard_offset: torch.Tensor
    length: torch.Tensor
    param_offset: torch.Tensor
    row_len: torch.Tensor
    block: torch.Tensor
    rowscale_start: torch.Tensor
    rowscale: torch.Tensor
    block_k: torch.Tensor

    @property
    def num_segments(self) -> int:
        return int(self.length.numel())

    @property
    def num_blocks(self) -> int:
        return int(self.block_k.numel())

    @staticmethod
    def build(
        rows: list[tuple[int, int, int, int, int, int]],
        rowscale: torch.Tensor | None,
        block_k: list[int],
        device: torch.device | str = "cpu",
    ) -> SegmentTable:
        """Build from rows of (shard_offset, length, param_offset, row_len, block, rowscale_start)."""
        columns = list(zip(*rows, strict=True)) if rows else [()] * 6
        as_long = [torch.tensor(col, dtype=torch.int64, device=device) for col in columns]
        if rowscale is None:
            rowscale = torch.empty(0, dtype=torch.float32)
        return SegmentTable(
            *as_long,
            rowscale=rowscale.to(device=device, dtype=torch.float32),
            block_k=torch.tensor(block_k, dtype=torch.int64, device=device),
        )

    def rows(self) -> list[tuple[int, int, int, int, int, int]]:
        """The rows back as Python ints (used by the reference implementations)."""
        cols = [
            self.shard_offset,
            self.length,
            self.param_offset,
            self.row_len,
            self.block,
            self.rowscale_start,
        ]
        return list(zip(*(c.tolist() for c in cols), strict=True))

    def split_at_spans(self, spans: list[tuple[int, int]]) -> tuple[SegmentTable, SegmentTable]:
        """(inside, outside): the parts of this table's segments inside and outside the shard
        spans [first, last) (ascending, disjoint), as two tables of the same blocks."""
        inside: list[tuple[int, int, int, int, int, int]] = []
        outside: list[tuple[int, int, int, int, int, int]] = []
        starts = [first for first, _ in spans]
        for row in self.rows():
            shard_offset, length = row[0], row[1]
            end = shard_offset + length
            cursor = shard_offset
            for first, last in spans[max(bisect.bisect_right(starts, shard_offset) - 1, 0) :]:
                if first >= end:
                    break
                if last <= cursor:
                    continue
                if first > cursor:
                    outside.append(_part(row, cursor, first))
                inside.append(_part(row, max(first, cursor), min(last, end)))
                cursor = min(last, end)
            if cursor < end:
                outside.append(_part(row, cursor, end))
        block_k = self.block_k.tolist()
        device = self.length.device
        return (
            SegmentTable.build(inside, self.rowscale, block_k, device),
            SegmentTable.build(outside, self.rowscale, block_k, device),
        )

    def to(self, device: torch.device | str) -> SegmentTable:
        return SegmentTable(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


def _part(
    row: tuple[int, int, int, int, int, int], first: int, last: int
) -> tuple[int, int, int, int, int, int]:
    """The row of shard elements [first, last) of the segment `row`."""
    shard_offset, _, param_offset, row_len, block, rowscale_start = row
    return (first, last - first, param_offset + first - shard_offset, row_len, block, rowscale_start)
