"""The segment table: how the kernels see one flat fp32 shard.

A flat shard (a ZeRO partition, or a single parameter without ZeRO) holds pieces of several
parameters back to back. On the "cpu" backend the shard may also be virtual: separate tensors
laid end to end (tiles.TensorList, the multi-tensor step without ZeRO), every segment inside one
of them; the table is the same, only the ops' buffers differ. Each piece is a *segment*;
elements of the shard that belong to no segment (ZeRO alignment padding, frozen parameters)
are never read or written.

The kernels know nothing about models or DeepSpeed: they see only these integer columns.
"""

from __future__ import annotations

import bisect
import dataclasses
import weakref
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
    counter[s]        the step counter whose count bias-corrects segment s's update (the
                      optimizer's counter of the segment's parameter; 0 in a table built
                      without counters). Counts are per parameter because a parameter held by
                      HFT resampling keeps its moments but takes no updates: its moments have
                      seen fewer steps than the shard's.
    block_counter     int64 [n_blocks]: the counter of each block's segments (a block lies
                      inside one parameter, so it has one), for entries listed by block; 0 for
                      a block with no segment here
    """

    shard_offset: torch.Tensor
    length: torch.Tensor
    param_offset: torch.Tensor
    row_len: torch.Tensor
    block: torch.Tensor
    rowscale_start: torch.Tensor
    rowscale: torch.Tensor
    block_k: torch.Tensor
    counter: torch.Tensor
    block_counter: torch.Tensor

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
        counters: list[int] | None = None,
    ) -> SegmentTable:
        """Build from rows of (shard_offset, length, param_offset, row_len, block, rowscale_start)
        and each row's step counter (default: all 0)."""
        columns = list(zip(*rows, strict=True)) if rows else [()] * 6
        as_long = [torch.tensor(col, dtype=torch.int64, device=device) for col in columns]
        if rowscale is None:
            rowscale = torch.empty(0, dtype=torch.float32)
        counters = [0] * len(rows) if counters is None else list(counters)
        if len(counters) != len(rows):
            raise ValueError(f"{len(counters)} counters for {len(rows)} segments")
        block_counter = [0] * len(block_k)
        for row, counter in zip(rows, counters, strict=True):
            if 0 <= row[4] < len(block_counter):  # (DENSE has none; a bad block is refused by tile_table)
                block_counter[row[4]] = counter
        return SegmentTable(
            *as_long,
            rowscale=rowscale.to(device=device, dtype=torch.float32),
            block_k=torch.tensor(block_k, dtype=torch.int64, device=device),
            counter=torch.tensor(counters, dtype=torch.int64, device=device),
            block_counter=torch.tensor(block_counter, dtype=torch.int64, device=device),
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
        inside_counters: list[int] = []
        outside_counters: list[int] = []
        starts = [first for first, _ in spans]
        for row, counter in zip(self.rows(), self.counter.tolist(), strict=True):
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
                    outside_counters.append(counter)
                inside.append(_part(row, max(first, cursor), min(last, end)))
                inside_counters.append(counter)
                cursor = min(last, end)
            if cursor < end:
                outside.append(_part(row, cursor, end))
                outside_counters.append(counter)
        block_k = self.block_k.tolist()
        device = self.length.device
        return (
            SegmentTable.build(inside, self.rowscale, block_k, device, inside_counters)._with_blocks_of(self),
            SegmentTable.build(outside, self.rowscale, block_k, device, outside_counters)._with_blocks_of(
                self
            ),
        )

    def _with_blocks_of(self, table: SegmentTable) -> SegmentTable:
        """This table with `table`'s block counters (a part of it may lack some blocks' segments)."""
        return dataclasses.replace(self, block_counter=table.block_counter)

    def to(self, device: torch.device | str) -> SegmentTable:
        return SegmentTable(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


_COUNTERS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}


def host_counters(table: SegmentTable) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(counter of each segment, counter of each block) as Python ints, read from the device once
    per table (cached like the tile tables: tables are immutable), not once per step."""
    key = id(table)
    counters = _COUNTERS.get(key)
    if counters is None:
        counters = (tuple(table.counter.tolist()), tuple(table.block_counter.tolist()))
        _COUNTERS[key] = counters
        weakref.finalize(table, _COUNTERS.pop, key, None)
    return counters


def _part(
    row: tuple[int, int, int, int, int, int], first: int, last: int
) -> tuple[int, int, int, int, int, int]:
    """The row of shard elements [first, last) of the segment `row`."""
    shard_offset, _, param_offset, row_len, block, rowscale_start = row
    return (first, last - first, param_offset + first - shard_offset, row_len, block, rowscale_start)
