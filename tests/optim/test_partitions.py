"""Partition discovery on its own: DeepSpeed's bookkeeping in, ShardLayouts out.

ZeRO-1/2 mappings are made by DeepSpeed's own `get_hp_fragment_mapping` (what its optimizers call
for every parameter) over a simulated partitioning; ZeRO-3 from a stand-in of the stage-3
optimizer's attributes, the ones `zero3_layouts` reads. Both are checked against layouts worked
out by hand, and over all ranks every element of every parameter must be held exactly once.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from deepspeed.utils.tensor_fragment import get_hp_fragment_mapping

from dsforget.optim.layout import Segment
from dsforget.optim.partitions import (
    UnsupportedSetupError,
    discover_layouts,
    fragment_layouts,
    zero3_layouts,
)

SHAPES = {"a.weight": (3, 5), "b.weight": (7,), "c.weight": (2, 4)}  # 15 + 7 + 8 = 30 elements


def zero12_rank(rank: int, world: int) -> tuple[list[dict], list[list[str]], dict[str, torch.Tensor]]:
    """One param group's parameters as ZeRO-1/2 leaves them on `rank`: the group a flat slice of
    ceil(30 / world) elements of their concatenation, each parameter with its `_hp_mapping`."""
    params = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    total = sum(p.numel() for p in params.values())
    size = math.ceil(total / world)
    start = rank * size
    flat = torch.zeros(size)
    lp_start = 0
    for param in params.values():
        overlaps = lp_start < start + size and lp_start + param.numel() > start
        param._hp_mapping = (
            get_hp_fragment_mapping(param, lp_start, flat, {}, {}, False, 0, start, size)
            if overlaps
            else None
        )
        lp_start += param.numel()
    return [{"params": [flat]}], [list(SHAPES)], params


def test_zero12_fragments_give_the_hand_worked_layout() -> None:
    """Catches shard and parameter offsets swapped, or a parameter cut between ranks lost: rank 1
    of 2 holds elements 15..29 = all of b (shard 0..7) and all of c (shard 7..15); rank 0 of 3
    holds a[0:10]; rank 1 holds a[10:15], b[0:5]."""
    layout = fragment_layouts(*zero12_rank(1, 2))[0][1]
    assert layout.segments == (Segment("b.weight", 0, 0, 7, 1), Segment("c.weight", 0, 7, 8, 4))
    layout = fragment_layouts(*zero12_rank(0, 3))[0][1]
    assert layout.numel == 10
    assert layout.segments == (Segment("a.weight", 0, 0, 10, 5),)
    assert fragment_layouts(*zero12_rank(1, 3))[0][1].segments == (
        Segment("a.weight", 10, 0, 5, 5),
        Segment("b.weight", 0, 5, 5, 1),
    )
    assert layout.group_params == (("a.weight", 15), ("b.weight", 7), ("c.weight", 8))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_zero12_ranks_together_hold_every_element_once(world: int) -> None:
    """Catches elements held twice or nowhere when a cut falls mid-row or mid-parameter."""
    held = {name: torch.zeros(math.prod(shape), dtype=torch.int64) for name, shape in SHAPES.items()}
    for rank in range(world):
        for _, layout in fragment_layouts(*zero12_rank(rank, world)):
            for seg in layout.segments:
                held[seg.name][seg.param_offset : seg.param_offset + seg.length] += 1
    for name, counts in held.items():
        assert torch.equal(counts, torch.ones_like(counts)), (name, counts.tolist())


def test_zero12_missing_mapping_or_wrong_group_is_refused() -> None:
    groups, names, params = zero12_rank(0, 2)
    del params["b.weight"]._hp_mapping
    with pytest.raises(UnsupportedSetupError, match="parameter b.weight has no _hp_mapping"):
        fragment_layouts(groups, names, params)
    groups, names, params = zero12_rank(0, 2)
    params["a.weight"]._hp_mapping.param_group_index = 3
    with pytest.raises(UnsupportedSetupError, match="a.weight is mapped to group 3, not 0"):
        fragment_layouts(groups, names, params)
    groups, names, params = zero12_rank(0, 2)
    groups[0]["params"].append(torch.zeros(1))
    with pytest.raises(UnsupportedSetupError, match="param group 0 holds 2 tensors, expected 1 flat"):
        fragment_layouts(groups, names, params)


def zero3_stage(rank: int, world: int) -> tuple[SimpleNamespace, dict[int, str]]:
    """A stand-in for DeepSpeed's stage-3 optimizer on `rank`: one sub-group whose flat fp32
    partition concatenates this rank's ceil(numel / world) slice of each parameter, padding
    included (the last ranks' tails of a parameter are padding)."""
    params, positions, shard_offset = [], {}, 0
    for index, shape in enumerate(SHAPES.values()):
        param = torch.nn.Parameter(torch.zeros(0))
        param.ds_numel, param.ds_shape, param.ds_process_group, param.ds_id = (
            math.prod(shape),
            shape,
            "dp",
            index,
        )
        partition = math.ceil(param.ds_numel / world)
        positions[index] = (0, shard_offset, partition)
        shard_offset += partition
        params.append(param)
    stage3 = SimpleNamespace(
        fp16_groups=[params],
        fp32_partitioned_groups_flat=[torch.zeros(shard_offset)],
        grad_position=positions,
        get_param_id=lambda p: p.ds_id,
        dp_process_group="dp",
    )
    return stage3, {id(p): name for p, name in zip(params, SHAPES, strict=True)}


@pytest.fixture
def as_rank(monkeypatch):
    """Make deepspeed.comm.get_rank answer for a simulated rank (no process group needed)."""
    import deepspeed.comm

    def set_rank(rank: int) -> None:
        monkeypatch.setattr(deepspeed.comm, "get_rank", lambda group=None: rank)

    return set_rank


def test_zero3_slices_skip_padding_and_keep_shard_offsets(as_rank) -> None:
    """Catches padding counted as parameter elements, or shard offsets taken from the parameter:
    with 4 ranks, a (15 elements) has slices of 4, b (7) and c (8) slices of 2, so rank 3 holds
    a[12:15] in 3 of its 4 slots, b[6:7] in 1 of 2, and c[6:8]. (1-D parameters: rows of 1.)"""
    stage3, names = zero3_stage(3, 4)
    as_rank(3)
    layouts, group = zero3_layouts(stage3, names)
    assert group == "dp"
    ((flat, layout),) = layouts
    assert layout.numel == flat.numel() == 4 + 2 + 2
    assert layout.segments == (
        Segment("a.weight", 12, 0, 3, 5),
        Segment("b.weight", 6, 4, 1, 1),
        Segment("c.weight", 6, 6, 2, 4),
    )


@pytest.mark.parametrize("world", [1, 2, 3, 5, 16])
def test_zero3_ranks_together_hold_every_element_once(world: int, as_rank) -> None:
    held = {name: torch.zeros(math.prod(shape), dtype=torch.int64) for name, shape in SHAPES.items()}
    for rank in range(world):
        stage3, names = zero3_stage(rank, world)
        as_rank(rank)
        for _, layout in zero3_layouts(stage3, names)[0]:
            for seg in layout.segments:
                held[seg.name][seg.param_offset : seg.param_offset + seg.length] += 1
    for name, counts in held.items():
        assert torch.equal(counts, torch.ones_like(counts)), (name, counts.tolist())


def test_zero3_unsupported_setups_are_named(as_rank) -> None:
    """An unknown DeepSpeed (an attribute gone) and NVMe swapping fail with the reason."""
    as_rank(0)
    stage3, names = zero3_stage(0, 2)
    del stage3.grad_position
    with pytest.raises(
        UnsupportedSetupError, match=r"lacks \['grad_position'\]; dsforget supports deepspeed"
    ):
        zero3_layouts(stage3, names)
    stage3, names = zero3_stage(0, 2)
    stage3.swap_optimizer = True
    with pytest.raises(UnsupportedSetupError, match="NVMe optimizer swapping is not supported"):
        zero3_layouts(stage3, names)
    stage3, names = zero3_stage(0, 2)
    stage3.grad_position[1] = (1, 0, 4)
    with pytest.raises(UnsupportedSetupError, match="grad_position places b.weight in sub-group 1"):
        zero3_layouts(stage3, names)


def test_discovery_from_parameters_alone(as_rank, monkeypatch) -> None:
    """What the optimizer does under plain deepspeed.initialize: ZeRO-3 parameters lead to their
    optimizer (_z3_optimizer), ZeRO-1/2 ones carry fragments, bare ones are refused."""
    from deepspeed.utils import groups as ds_groups

    as_rank(1)
    stage3, names = zero3_stage(1, 2)
    params = {name: p for p in stage3.fp16_groups[0] for name in [names[id(p)]]}
    for p in params.values():
        p._z3_optimizer = stage3
    layouts, group = discover_layouts([], [], params)
    assert group == "dp" and layouts[0][1].segments[0] == Segment("a.weight", 8, 0, 7, 5)

    monkeypatch.setattr(ds_groups, "_get_data_parallel_group", lambda: "world")
    groups, group_names, params = zero12_rank(1, 2)
    layouts, group = discover_layouts(groups, group_names, params)
    assert group == "world" and layouts[0][1].segments[0].name == "b.weight"

    bare = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    with pytest.raises(UnsupportedSetupError, match="carry no DeepSpeed partition mapping"):
        discover_layouts([{"params": [torch.zeros(30)]}], [list(SHAPES)], bare)
