"""ShardLayout: which pieces of which parameters a flat fp32 partition holds.

DeepSpeed hands a client optimizer flat fp32 tensors, not parameters:
- no ZeRO: each parameter itself (one segment covering it); the optimizer steps a group's
  parameters together, their layouts laid end to end over a TensorList (optimizer.py);
- ZeRO-1/2 (and the bf16 optimizer): per param group, this rank's contiguous slice of the
  concatenation of all the group's parameters, so a parameter may be cut anywhere, or absent;
- ZeRO-3: per sub-group, the concatenation of this rank's padded slice of *every* parameter.
The layout is built once after ``deepspeed.initialize`` from DeepSpeed's own bookkeeping
(``param._hp_mapping`` fragments for ZeRO-1/2, ``grad_position`` for ZeRO-3) and looked up by
the identity of whatever tensor DeepSpeed passes to ``step()``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .params import row_length


@dataclass(frozen=True)
class Segment:
    """Elements [shard_offset, shard_offset + length) of the shard are elements
    [param_offset, param_offset + length) of parameter `name` (flattened row-major)."""

    name: str
    param_offset: int
    shard_offset: int
    length: int
    row_len: int


@dataclass(frozen=True)
class ShardLayout:
    """One flat partition.

    numel          length of the flat tensor, padding included
    segments       the pieces this rank holds, in shard order
    group_params   (name, full numel) of every parameter of the partition's group on *any*
                   rank, in DeepSpeed's order: the blocks exact top-k reduces over, identical
                   on every rank of the data-parallel group
    """

    numel: int
    segments: tuple[Segment, ...]
    group_params: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        end = 0
        for seg in sorted(self.segments, key=lambda s: s.shard_offset):
            if seg.length <= 0 or seg.shard_offset < end:
                raise ValueError(
                    f"segment {seg} is empty or overlaps the previous one in a {self.numel}-element shard"
                )
            end = seg.shard_offset + seg.length
        if end > self.numel:
            raise ValueError(f"segments end at {end}, past the {self.numel}-element shard")
        group = dict(self.group_params)
        for seg in self.segments:
            if seg.name not in group or seg.param_offset + seg.length > group[seg.name]:
                raise ValueError(
                    f"segment {seg} lies outside its parameter (group holds {group.get(seg.name)})"
                )

    @staticmethod
    def whole(name: str, shape: tuple[int, ...]) -> ShardLayout:
        """A parameter that is its own shard (no ZeRO)."""
        numel = 1
        for size in shape:
            numel *= size
        segments = (Segment(name, 0, 0, numel, row_length(shape)),) if numel else ()
        return ShardLayout(numel=numel, segments=segments, group_params=((name, numel),))
