"""Tile tables (aligned for Triton, unaligned for the C++ backend), the Triton launch table, and
the Triton kernels at every (TILE, num_warps) that table can choose, under the interpreter.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import pytest
import torch
from dsforget.kernels import DENSE, NUM_LEVELS, RadixState, abs_histogram, level_bins, refine, update_moments
from dsforget.kernels._triton import triton
from dsforget.kernels.masked_update import DEFER_SHIFT, NO_DEFERRAL, AdamWScalars
from dsforget.kernels.moments import HINT_SHIFT, HINT_WINDOW, HintedCounts
from dsforget.kernels.radix import abs_bits, digit_and_prefix
from dsforget.kernels.tiles import (
    TRITON_LAUNCH,
    TensorList,
    forced_triton_launch,
    tile_table,
    triton_buffer,
    triton_launch,
    triton_launches,
    triton_tiles,
)
from helpers import (
    BETA1,
    BETA2,
    LAYOUTS,
    UPDATE,
    assert_bitwise,
    assert_close,
    assert_padding_untouched,
    build_shard,
    clone,
    masked_adamw_on,
    random_state,
)

# Segments longer than two 4096-element tiles (full tiles at every table TILE), starting inside
# a window, besides the small layout's one-element, empty and DENSE pieces.
ALIGN_LAYOUT = [
    (9001, 5, 7, 0, False),
    (33, 0, 1, DENSE, False),
    (8195, 13, 10, 1, True),
    (0, 0, 4, 2, False),
    (500, 2000, 7, 0, False),
    (1, 0, 1, 3, False),
    (4500, 9, 16, DENSE, True),
]


def segment_tiles(tiles, segment: int) -> list[int]:
    return tiles.tile_start[tiles.tile_segment == segment].tolist()


@pytest.mark.parametrize("tile_size", [1, 4, 256, 4096])
@pytest.mark.parametrize("layout", ["small", "large", "align"])
def test_aligned_tiles_cover_each_segment_once(layout, tile_size):
    """Catches aligned tiles that start off a multiple of TILE, miss a segment's first or last
    elements, give a segment a tile that does not meet it or one window twice, or tiles for empty
    segments; and the unaligned table (the C++ backend's) changing."""
    table = build_shard({"align": ALIGN_LAYOUT, **LAYOUTS}[layout], "cpu").table
    aligned = tile_table(table, tile_size, aligned=True)
    unaligned = tile_table(table, tile_size)
    assert aligned.aligned and not unaligned.aligned
    assert tile_table(table, tile_size, aligned=True) is aligned, "the aligned table must be cached"
    assert aligned.extent == unaligned.extent
    assert (aligned.tile_start % tile_size == 0).all()
    assert (aligned.tile_segment.diff() >= 0).all(), "tiles must be grouped by segment, in order"
    for segment, (shard_offset, length, *_) in enumerate(table.rows()):
        end = shard_offset + length
        starts = segment_tiles(aligned, segment)
        expected = list(range(shard_offset // tile_size * tile_size, end, tile_size)) if length else []
        assert starts == expected, (segment, starts[:4], expected[:4])
        assert segment_tiles(unaligned, segment) == list(range(shard_offset, end, tile_size))


def test_launch_table():
    """Catches a launch table row a kernel cannot use (TILE not a power of two, fewer than 4 fp32
    a thread: no 16-byte access), bounds out of order, no unbounded last row, and a forced launch
    that leaks out of its block."""
    for kernel, rows in TRITON_LAUNCH.items():
        bounds = [bound for bound, _, _ in rows]
        assert bounds[-1] is None and None not in bounds[:-1] and bounds[:-1] == sorted(bounds[:-1]), kernel
        for _, tile_size, num_warps in rows:
            assert tile_size & (tile_size - 1) == 0 and tile_size // (32 * num_warps) >= 4, (
                kernel,
                tile_size,
            )
        assert triton_launch(kernel, 0) == rows[0][1:]
        assert triton_launch(kernel, 1 << 40) == rows[-1][1:]
        for bound, tile_size, num_warps in rows[:-1]:
            assert triton_launch(kernel, bound - 1) == (tile_size, num_warps)
            assert triton_launch(kernel, bound) != (tile_size, num_warps)
    table = build_shard(LAYOUTS["small"], "cpu").table
    with forced_triton_launch(64, 1):
        assert triton_launch("masked_adamw", 1 << 40) == (64, 1)
        tiles, num_warps = triton_tiles(table, "update_moments")
        assert (tiles.tile_size, num_warps, tiles.aligned) == (64, 1, True)
    assert triton_launch("masked_adamw", 1 << 40) == TRITON_LAUNCH["masked_adamw"][-1][1:]
    with pytest.raises(ValueError, match="power of two"):
        with forced_triton_launch(1000, 4):
            pass


def hinted_windows(state: dict, table) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block a window around one of its entries (block 1: none)."""
    start = torch.full((table.num_blocks,), -1, dtype=torch.int64)
    width = HINT_WINDOW - 3 * torch.arange(table.num_blocks, dtype=torch.int64)
    for shard_offset, length, _, _, block, _ in table.rows():
        if block not in (DENSE, 1) and length > 0:
            prefix = int(abs_bits(state["exp_avg"][shard_offset].reshape(1)).item()) >> HINT_SHIFT
            start[block] = prefix - int(width[block]) // 2
    return start, width


def every_op(shard, before: dict, backend: str) -> dict[str, torch.Tensor]:
    """Every fused Triton op on a copy of `before`, as a step runs them: the moments with the
    level-0 histogram and nonzero counts (and again with windows), the radix levels from those
    histograms through abs_histogram, then the masked update deferring every other block's last
    bin. Returns all outputs by name."""
    table, device = shard.table, shard.covered.device
    state, hinted_state = clone(before), clone(before)
    blocks = table.num_blocks
    histogram = torch.zeros(blocks, level_bins(0), dtype=torch.int64, device=device)
    nonzero = torch.zeros(blocks, dtype=torch.int64, device=device)
    moments = (state["grad"], state["exp_avg"], state["exp_avg_sq"], table)
    update_moments(*moments, beta1=BETA1, beta2=BETA2, histogram=histogram, nonzero=nonzero, backend=backend)
    start, width = hinted_windows(before, table)
    hinted = HintedCounts(
        start, width, torch.zeros_like(start), torch.zeros(blocks, HINT_WINDOW, dtype=torch.int64)
    )
    hinted_histogram = torch.zeros_like(histogram)
    update_moments(
        hinted_state["grad"],
        hinted_state["exp_avg"],
        hinted_state["exp_avg_sq"],
        table,
        beta1=BETA1,
        beta2=BETA2,
        histogram=hinted_histogram,
        hinted=hinted,
        backend=backend,
    )
    outputs = {
        "exp_avg": state["exp_avg"],
        "exp_avg_sq": state["exp_avg_sq"],
        "level-0 histogram": histogram,
        "nonzero": nonzero,
        "hinted exp_avg": hinted_state["exp_avg"],
        "hinted level-0 histogram": hinted_histogram,
        "above": hinted.above,
        "window histogram": hinted.histogram,
    }
    radix = RadixState.start(table.block_k)
    refine(radix, histogram, 0)
    for level in range(1, NUM_LEVELS - 1):  # the last level is deferred below
        counts = torch.zeros(blocks, level_bins(level), dtype=torch.int64, device=device)
        abs_histogram(state["exp_avg"], table, radix.prefix, level, counts, backend=backend)
        outputs[f"level-{level} histogram"] = counts
        refine(radix, counts, level)
    # the bin of each open block's threshold (a resolved one's), every other block deferring it
    open_blocks = radix.prefix != -1
    bins = torch.where(open_blocks, radix.prefix, radix.threshold >> DEFER_SHIFT)
    defer_prefix = torch.where(torch.arange(blocks) % 2 == 0, bins, NO_DEFERRAL)
    thresholds = torch.where(open_blocks, (bins + 1) << DEFER_SHIFT, radix.threshold)
    thresholds = torch.where(defer_prefix == NO_DEFERRAL, bins << DEFER_SHIFT, thresholds)
    scalars = AdamWScalars(**UPDATE, weight_decay=0.1, decay_selected_only=False)
    deferred = masked_adamw_on(
        state,
        table,
        thresholds,
        scalars,
        backend,
        defer_prefix=defer_prefix,
        defer_capacity=shard.numel,
    )
    outputs["param"] = state["param"]
    deferred = deferred.compacted()  # (the Triton list: in slot order, its count on the device)
    for name in ("index", "block", "exp_avg", "exp_avg_sq"):
        outputs[f"deferred {name}"] = getattr(deferred, name)
    return outputs


LAUNCHES = sorted(triton_launches())
OTHER_LAUNCH = (64, 1)  # a TILE below every table row's, that the table's results must equal


@pytest.fixture(scope="module")
def align_case():
    """(shard, state before, outputs at OTHER_LAUNCH, outputs of the reference), built once."""
    shard = build_shard(ALIGN_LAYOUT, "cpu", seed=21)
    before = random_state(shard, seed=22)
    with forced_triton_launch(*OTHER_LAUNCH):
        expected = every_op(shard, before, "triton")
    return shard, before, expected, every_op(shard, before, "torch")


@pytest.mark.skipif(triton is None, reason="Triton is not installed")
@pytest.mark.parametrize(  # (run by test_triton.py, deselected elsewhere)
    ("tile_size", "num_warps"),
    LAUNCHES,
    ids=[f"triton-interpret-tile{tile}-warps{warps}" for tile, warps in LAUNCHES],
)
def test_every_launch_of_the_table_gives_the_same_bits(tile_size, num_warps, align_case):
    """Catches aligned tiles that lose or double elements at a segment's first or last tile (the
    lower bound missing from a mask: loads, stores, histograms, nonzero and window counts,
    deferral), an unmasked full-tile path taken for a partial tile, and results that depend on
    TILE: every op at each (TILE, num_warps) of the launch table equals, bit for bit, the same ops
    at another TILE, and the reference within rounding; padding stays untouched."""
    shard, before, expected, reference = align_case
    with forced_triton_launch(tile_size, num_warps):
        actual = every_op(shard, before, "triton")
    for name, tensor in expected.items():
        assert_bitwise(actual[name], tensor, f"{name} at TILE {tile_size} vs {OTHER_LAUNCH[0]}")
    assert actual["deferred index"].numel() > 0, "nothing deferred: the test checks less"
    covered = shard.covered
    for name in ("exp_avg", "exp_avg_sq", "param"):
        assert_close(actual[name][covered], reference[name][covered], name)
    # counts of the kernels' own m (theirs may differ from the reference's by an ulp)
    own_histogram, own_nonzero = (
        torch.zeros_like(actual["level-0 histogram"]),
        torch.zeros_like(actual["nonzero"]),
    )
    for shard_offset, length, _, _, block, _ in shard.table.rows():
        if block != DENSE:
            bits = abs_bits(actual["exp_avg"][shard_offset : shard_offset + length])
            own_histogram[block] += torch.bincount(digit_and_prefix(bits, 0)[0], minlength=level_bins(0))
            own_nonzero[block] += int((bits != 0).sum())
    assert_bitwise(actual["level-0 histogram"], own_histogram, "level-0 histogram")
    assert_bitwise(actual["nonzero"], own_nonzero, "nonzero")
    after = {name: actual[name] for name in ("exp_avg", "exp_avg_sq", "param")}
    assert_padding_untouched(after, {name: before[name] for name in after}, shard)


def test_a_lists_address_table_is_reused_while_its_tensors_stay():
    """The Triton kernels' address table of a TensorList holds its tensors' addresses; a second
    call for the same tensors reuses the table on the device (no copy per step), and a list with
    a new tensor (a gradient reallocated by backward) gets a table with the new address."""

    def listed(tensors: list[torch.Tensor]) -> TensorList:
        return TensorList(tuple(tensors), TensorList.starts_of([t.numel() for t in tensors]))

    tensors = [torch.zeros(5), torch.zeros(3)]
    pointer, table = triton_buffer(listed(tensors))
    assert pointer is tensors[0]
    assert table.tolist() == [t.data_ptr() for t in tensors]
    assert triton_buffer(listed(tensors))[1] is table
    replaced = [tensors[0], torch.zeros(3)]
    _, new_table = triton_buffer(listed(replaced))
    assert new_table is not table
    assert new_table.tolist() == [t.data_ptr() for t in replaced]
    assert triton_buffer(tensors[0]) == (tensors[0], None)
