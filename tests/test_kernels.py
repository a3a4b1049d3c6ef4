"""Kernel tests: every fused backend against the plain-PyTorch references, on flat shards.

Backends under test: "cpu" (the C++ extension) here; "triton" on CUDA tensors when a GPU is
present, and under the Triton interpreter in a subprocess that re-runs this file's triton
cases with TRITON_INTERPRET=1 (Triton reads it when kernels are decorated, i.e. when
dsforget.kernels is first imported, so it cannot be switched on inside this process). The
Triton kernels are also compiled for sm_90 here, which needs no GPU.

Every test starts from seeded random state (never zeros) and a shard whose padding between
segments is poisoned with NaN and +-1e30, which must come out bit for bit unchanged.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from dsforget.kernels import (
    DENSE,
    NO_ROWSCALE,
    NUM_LEVELS,
    RadixState,
    SegmentTable,
    ThresholdHint,
    abs_histogram,
    available_backends,
    default_backend,
    level_bins,
    masked_adamw,
    refine,
    topk_adamw_step,
    update_moments,
)
from dsforget.kernels import speculative as speculative_op
from dsforget.kernels import step as step_op
from dsforget.kernels._triton import INTERPRET, triton, triton_usable
from dsforget.kernels.masked_update import DEFER_SHIFT, NO_DEFERRAL, AdamWScalars
from dsforget.kernels.moments import HINT_SHIFT, HINT_WINDOW, HintedCounts
from dsforget.kernels.radix import LEVELS, RESOLVED, abs_bits, advance, advance_within, digit_and_prefix

REPO = Path(__file__).resolve().parents[1]
POISON = (math.nan, 1e30, -1e30)
BETA1, BETA2 = 0.9, 0.999
# fp32 state: a fused kernel may round differently from ATen (FMA, sqrt) by an ulp or two.
RTOL, ATOL = 1e-5, 1e-7


def fused_backends(include_large: bool = False) -> list:
    """(backend, device, size) cases that can run in this process."""
    cases = [pytest.param("cpu", "cpu", "small", id="cpu-small")]
    if include_large:
        cases.append(pytest.param("cpu", "cpu", "large", id="cpu-large"))
    if triton_usable(torch.device("cuda")):
        cases.append(pytest.param("triton", "cuda", "small", id="triton-cuda-small"))
        if include_large:
            cases.append(pytest.param("triton", "cuda", "large", id="triton-cuda-large"))
    if INTERPRET and triton is not None:
        cases.append(pytest.param("triton", "cpu", "small", id="triton-interpret-small"))
    return cases


# ---------------------------------------------------------------------------- shard builders


@dataclass
class Shard:
    """A flat shard: its table, its length and which elements belong to a segment."""

    table: SegmentTable
    numel: int
    covered: torch.Tensor  # bool [numel]


# (length, param_offset, row_len, block, rowscaled): odd lengths, mid-row starts, a second
# piece of block 0, a one-element block, an empty segment, DENSE and row-scaled DENSE pieces.
SMALL_LAYOUT = [
    (1037, 5, 7, 0, False),
    (33, 0, 1, DENSE, False),
    (1501, 13, 10, 1, True),
    (0, 0, 4, 2, False),
    (500, 2000, 7, 0, False),
    (1, 0, 1, 3, False),
    (203, 9, 16, DENSE, True),
]
# > 2 x 64K elements so the CPU backend splits the work over threads mid-segment and mid-block.
LARGE_LAYOUT = [
    (70001, 100, 333, 0, False),
    (4097, 0, 1, DENSE, False),
    (90000, 777, 1000, 1, True),
    (30011, 3, 17, 0, False),
    (9000, 5, 64, DENSE, True),
]
LAYOUTS = {"small": SMALL_LAYOUT, "large": LARGE_LAYOUT}


def build_shard(layout: list[tuple[int, int, int, int, bool]], device: str, seed: int = 0) -> Shard:
    """Segments in layout order with 3..9 poisoned padding elements before each and at the end."""
    generator = torch.Generator().manual_seed(seed)
    rows, scales, offset = [], [], 0
    for index, (length, param_offset, row_len, block, rowscaled) in enumerate(layout):
        offset += 3 + (index * 5) % 7
        rowscale_start = NO_ROWSCALE
        if rowscaled:
            rowscale_start = sum(s.numel() for s in scales)
            num_rows = (param_offset + length - 1) // row_len + 1
            scales.append(torch.rand(num_rows, generator=generator) * 1.5 + 0.25)
        rows.append((offset, length, param_offset, row_len, block, rowscale_start))
        offset += length
    numel = offset + 4
    num_blocks = max(row[4] for row in rows) + 1
    block_sizes = [sum(row[1] for row in rows if row[4] == block) for block in range(num_blocks)]
    block_k = [max(1, int(0.15 * n)) for n in block_sizes]
    rowscale = torch.cat(scales) if scales else None
    covered = torch.zeros(numel, dtype=torch.bool)
    for shard_offset, length, *_ in rows:
        covered[shard_offset : shard_offset + length] = True
    table = SegmentTable.build(rows, rowscale, block_k, device=device)
    return Shard(table, numel, covered.to(device))


def random_state(shard: Shard, seed: int, grad_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """param, grad, exp_avg, exp_avg_sq: random on segments, poisoned on padding."""
    generator = torch.Generator().manual_seed(seed)
    n = shard.numel
    state = {
        "param": torch.randn(n, generator=generator),
        "grad": torch.randn(n, generator=generator).to(grad_dtype),
        "exp_avg": torch.randn(n, generator=generator) * 0.1,
        "exp_avg_sq": torch.rand(n, generator=generator) * 0.01 + 1e-4,
    }
    padding = (~shard.covered).nonzero().flatten().cpu()
    for tensor in state.values():
        tensor[padding] = torch.tensor(POISON, dtype=tensor.dtype).repeat(len(padding) // 3 + 1)[
            : len(padding)
        ]
    return {name: tensor.to(shard.covered.device) for name, tensor in state.items()}


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in state.items()}


# ------------------------------------------------------------------------------ assertions


def _report(what: str, bad: torch.Tensor, actual: torch.Tensor, expected: torch.Tensor, rule: str) -> str:
    where = bad.nonzero().flatten()[:8].tolist()
    first = ", ".join(f"[{i}] {actual[i].item()!r} vs expected {expected[i].item()!r}" for i in where)
    return f"{what}: {int(bad.sum())} of {bad.numel()} elements differ ({rule}); first: {first}"


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL, atol: float = ATOL
):
    actual, expected = actual.float().cpu(), expected.float().cpu()
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    assert not bad.any(), _report(what, bad, actual, expected, f"rtol={rtol}, atol={atol}")


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """Floats as integers of their width, so NaN == NaN and -0.0 != +0.0."""
    if not tensor.is_floating_point():
        return tensor
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str):
    actual, expected = actual.cpu(), expected.cpu()
    bad = as_bits(actual) != as_bits(expected)
    assert not bad.any(), _report(what, bad, actual, expected, "bit for bit")


def assert_padding_untouched(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor], shard: Shard):
    padding = ~shard.covered
    for name in after:
        assert_bitwise(after[name][padding], before[name][padding], f"{name} padding")


# ------------------------------------------------------------------------------- the step


def select_thresholds(shards, states, backend: str, levels_seen: list[int] | None = None) -> RadixState:
    """Exact-mode selection over several shards (ranks) of the same blocks: the histograms of
    every shard are summed before each refinement, as the all-reduce does."""
    table = shards[0].table
    radix = RadixState.start(table.block_k)
    for level in range(NUM_LEVELS):
        if radix.done:
            break
        total = torch.zeros(
            table.num_blocks, level_bins(level), dtype=torch.int64, device=table.block_k.device
        )
        for shard, state in zip(shards, states, strict=True):
            histogram = torch.zeros_like(total)
            if level == 0:
                update_moments(
                    state["grad"],
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    shard.table,
                    beta1=BETA1,
                    beta2=BETA2,
                    histogram=histogram,
                    backend=backend,
                )
            else:
                abs_histogram(state["exp_avg"], shard.table, radix.prefix, level, histogram, backend=backend)
            total += histogram
        refine(radix, total, level)
        if levels_seen is not None:
            levels_seen.append(level)
    return radix


UPDATE = {"lr": 1e-2, "bias_correction1": 1 - BETA1**5, "bias_correction2": 1 - BETA2**5, "eps": 1e-8}


# ------------------------------------------------------------------------------ op tests


@pytest.mark.parametrize(
    ("backend", "device"), [pytest.param(*case.values[:2], id=case.id) for case in fused_backends()]
)
def test_radix_advance_matches_torch(backend, device):
    """Catches a C++ or Triton bin search that takes the wrong bin at empty bins, at the top or
    bottom bin, or when fewer entries than wanted exist, a wrong early resolution, blocks outside
    the mask or already resolved touched, a window base or skipped count applied wrongly, a
    refine that derives the wrong base, and a window that claims (or misses) the wrong blocks."""
    generator = torch.Generator().manual_seed(8)
    outcomes = set()
    for trial in range(200 if backend == "cpu" else 30):  # the Triton interpreter is slow
        n = int(torch.randint(1, 9, (1,), generator=generator))
        level = trial % NUM_LEVELS
        bins = level_bins(level)
        sparse = torch.rand(n, bins, generator=generator) < (0.002 if trial % 3 else 0.05)
        histogram = torch.randint(1, 4, (n, bins), generator=generator) * sparse
        wanted = (histogram.sum(1).float() * torch.rand(n, generator=generator) * 1.1).long()
        skipped = torch.randint(0, 3, (n,), generator=generator)
        start = RadixState.start(wanted.clamp(min=0) + skipped)
        start.prefix = torch.randint(-1, 50, (n,), generator=generator)  # -1: resolved already
        base = torch.randint(0, 1000, (n,), generator=generator)
        blocks = torch.rand(n, generator=generator) < 0.7 if trial % 2 else None
        variant = ("advance", "within", "refine")[trial // NUM_LEVELS % 3]
        results, moved_masks = [], []
        for name in ("torch", backend):
            tensors = (start.prefix, start.remaining, start.threshold, start.matching)
            state = RadixState(*(t.clone().to(device) for t in tensors))
            on_device = [None if t is None else t.to(device) for t in (histogram, base, skipped, blocks)]
            if variant == "advance":
                advance(state, on_device[0], level, *on_device[1:], backend=name)
            elif variant == "within":
                moved_masks.append(
                    advance_within(state, on_device[0], level, *on_device[1:3], backend=name).cpu()
                )
            else:
                refine(state, on_device[0], level, blocks=on_device[3], backend=name)
            results.append(
                RadixState(
                    *(t.cpu() for t in (state.prefix, state.remaining, state.threshold, state.matching))
                )
            )
        for name in ("prefix", "remaining", "threshold", "matching"):
            assert_bitwise(
                getattr(results[1], name), getattr(results[0], name), f"trial {trial} {variant} {name}"
            )
        if variant == "within":
            assert_bitwise(moved_masks[1], moved_masks[0], f"trial {trial} moved blocks")
            outcomes.update(("hit" if hit else "miss") for hit in moved_masks[0][start.unresolved].tolist())
            continue
        moved = start.unresolved if blocks is None else start.unresolved & blocks
        outcomes.update(("resolved" if p == RESOLVED else "open") for p in results[0].prefix[moved].tolist())
    assert outcomes == {"resolved", "open", "hit", "miss"}, outcomes


def test_next_hint_in_cpp_matches_torch():
    """Catches a C++ hint whose center rounds a negative move towards zero instead of down, a
    reach that ignores the last reach or the cap, or a window not cut at prefix 0."""
    if "cpu" not in available_backends("cpu"):
        pytest.skip("no C++ compiler: the cpu backend is unavailable here")
    generator = torch.Generator().manual_seed(9)
    n = 500
    threshold = torch.randint(0, 1 << 31, (n,), generator=generator)
    threshold[:20] = torch.randint(0, 1 << 14, (20,), generator=generator)  # windows reaching below 0
    previous = ThresholdHint.around(
        (threshold >> HINT_SHIFT) + torch.randint(-300, 300, (n,), generator=generator),
        (threshold >> HINT_SHIFT) + torch.randint(-300, 300, (n,), generator=generator),
        torch.randint(-5, 700, (n,), generator=generator),
    )
    for before in (None, previous):
        expected = ThresholdHint.after(threshold, before, backend="torch")
        got = ThresholdHint.after(threshold, before, backend="cpu")
        for name in ("prefix", "center", "reach", "start", "width"):
            assert_bitwise(getattr(got, name), getattr(expected, name), name)
    assert bool((expected.start == 0).any() and (expected.width < 2 * expected.reach).any())


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


def thresholds_with_ties(state: dict[str, torch.Tensor], shard: Shard) -> torch.Tensor:
    """Per block, the bits of an entry near the 70th percentile of |m|; a tenth of the block's
    entries are set to exactly that |m| (both signs): ties that must all be selected."""
    generator = torch.Generator().manual_seed(7)
    exp_avg = state["exp_avg"]
    thresholds = torch.zeros(shard.table.num_blocks, dtype=torch.int64)
    for block in range(shard.table.num_blocks):
        index = torch.cat(
            [
                torch.arange(offset, offset + length, device=exp_avg.device)
                for offset, length, _, _, b, _ in shard.table.rows()
                if b == block
            ]
        )
        if index.numel() == 0:
            continue
        value = exp_avg[index].abs().quantile(0.7) if index.numel() > 1 else exp_avg[index].abs()[0]
        ties = index[
            torch.randperm(index.numel(), generator=generator)[: max(1, index.numel() // 10)].to(index.device)
        ]
        signs = torch.where(torch.arange(ties.numel(), device=ties.device) % 2 == 0, 1.0, -1.0)
        exp_avg[ties] = signs * value
        thresholds[block] = int(abs_bits(value.reshape(1)).item())
    return thresholds.to(exp_avg.device)


@pytest.mark.parametrize(
    ("weight_decay", "decay_selected_only"),
    [(0.0, False), (0.1, False), (0.1, True)],
    ids=["no-decay", "decay-all", "decay-selected"],
)
@pytest.mark.parametrize(("backend", "device", "size"), fused_backends(include_large=True))
def test_masked_adamw_matches_reference(backend, device, size, weight_decay, decay_selected_only):
    """Catches a wrong bias correction or eps placement, ties at the threshold dropped (>= vs >),
    DENSE segments masked, decay applied in the wrong scope, unselected entries changed when
    they must stay bit for bit, and writes into m, v or padding."""
    shard = build_shard(LAYOUTS[size], device, seed=5)
    before = random_state(shard, seed=6)
    thresholds = thresholds_with_ties(before, shard)
    expected, actual = clone(before), clone(before)
    scalars = AdamWScalars(**UPDATE, weight_decay=weight_decay, decay_selected_only=decay_selected_only)
    for state, name in ((expected, "torch"), (actual, backend)):
        masked_adamw(
            state["param"],
            state["exp_avg"],
            state["exp_avg_sq"],
            shard.table,
            thresholds,
            scalars,
            backend=name,
        )
    covered = shard.covered
    assert_close(actual["param"][covered], expected["param"][covered], "param")
    for name in ("grad", "exp_avg", "exp_avg_sq"):
        assert_bitwise(actual[name], before[name], f"{name} (read only)")
    assert_padding_untouched(actual, before, shard)

    selected = torch.zeros_like(covered)
    unselected = torch.zeros_like(covered)
    for offset, length, _, _, block, _ in shard.table.rows():
        span = slice(offset, offset + length)
        if block == DENSE:
            selected[span] = True
            continue
        chosen = abs_bits(before["exp_avg"][span]) >= thresholds[block]
        selected[span], unselected[span] = chosen, ~chosen
    assert (actual["param"] != before["param"])[selected].all(), (
        "a selected (or tied, or DENSE) entry did not move"
    )
    assert unselected.any()
    if weight_decay == 0 or decay_selected_only:
        assert_bitwise(actual["param"][unselected], before["param"][unselected], "unselected param")
    else:
        assert_close(
            actual["param"][unselected],
            before["param"][unselected] * (1 - UPDATE["lr"] * weight_decay),
            "decayed",
        )


@pytest.mark.parametrize(("backend", "device", "size"), fused_backends(include_large=True))
def test_masked_adamw_defers_the_bins_it_is_told(backend, device, size):
    """Catches a deferred entry whose p moved, one left out of the list or listed twice (the
    Triton kernel's slots: one atomic per program), a wrong block, m or v in the list, a list not
    in shard order, blocks with NO_DEFERRAL deferring, and a list longer than defer_capacity
    passing silently."""
    shard = build_shard(LAYOUTS[size], device, seed=15)
    before = random_state(shard, seed=16)
    thresholds = thresholds_with_ties(before, shard)
    bins = thresholds >> DEFER_SHIFT
    defer_prefix = torch.where(torch.arange(bins.numel(), device=device) % 2 == 1, NO_DEFERRAL, bins)
    passed = torch.where(defer_prefix == NO_DEFERRAL, thresholds, (bins + 1) << DEFER_SHIFT)
    scalars = AdamWScalars(**UPDATE, weight_decay=0.1, decay_selected_only=False)

    def update(backend_name: str, capacity: int):
        state = clone(before)
        deferred = masked_adamw(
            state["param"],
            state["exp_avg"],
            state["exp_avg_sq"],
            shard.table,
            passed,
            scalars,
            defer_prefix=defer_prefix,
            defer_capacity=capacity,
            backend=backend_name,
        )
        return state, deferred

    (expected, listed), (actual, got) = (update(name, shard.covered.numel()) for name in ("torch", backend))
    assert listed.index.numel() > 0, "nothing deferred: the test checks nothing"
    for name in ("index", "block", "exp_avg", "exp_avg_sq"):
        assert_bitwise(getattr(got, name), getattr(listed, name), f"deferred {name}")
    assert_bitwise(actual["param"][got.index], before["param"][got.index], "deferred param")
    covered = shard.covered
    assert_close(actual["param"][covered], expected["param"][covered], "param")
    assert_padding_untouched(actual, before, shard)
    with pytest.raises(RuntimeError, match="defer_capacity"):
        update(backend, listed.index.numel() - 1)


@pytest.mark.parametrize(("backend", "device", "size"), fused_backends())
def test_nothing_selected_leaves_param_bit_for_bit(backend, device, size):
    """Catches an update that is 'almost' zero for unselected entries (e.g. p + 0*x rounding,
    -0.0 turning into +0.0, NaN m leaking in)."""
    shard = build_shard([(997, 3, 11, 0, False), (501, 0, 1, 1, True)], device, seed=8)
    before = random_state(shard, seed=9)
    before["param"][shard.covered.nonzero().flatten()[:4]] = torch.tensor(
        [0.0, -0.0, 1e-38, -3.0], device=device
    )
    after = clone(before)
    # 0x7f800000 is +inf's bit pattern: no finite |m| reaches it
    thresholds = torch.full((2,), 0x7F800000, dtype=torch.int64, device=device)
    masked_adamw(
        after["param"],
        after["exp_avg"],
        after["exp_avg_sq"],
        shard.table,
        thresholds,
        AdamWScalars(**UPDATE, weight_decay=0.0, decay_selected_only=False),
        backend=backend,
    )
    assert_bitwise(after["param"], before["param"], "param")


@pytest.mark.parametrize(("backend", "device", "size"), fused_backends())
def test_shard_without_topk_blocks(backend, device, size):
    """Catches kernels that read the (empty) per-block tensors of a shard holding only DENSE
    segments (biases, norms, CoFiTune-only parameters): empty tensors may have no address."""
    shard = build_shard([(300, 0, 1, DENSE, False), (257, 3, 10, DENSE, True)], device, seed=17)
    before = random_state(shard, seed=18)
    expected, actual = clone(before), clone(before)
    no_blocks = torch.zeros(0, dtype=torch.int64, device=device)
    for state, name in ((expected, "torch"), (actual, backend)):
        histogram = torch.zeros(0, level_bins(0), dtype=torch.int64, device=device)
        moments = (state["grad"], state["exp_avg"], state["exp_avg_sq"], shard.table)
        update_moments(*moments, beta1=BETA1, beta2=BETA2, histogram=histogram, backend=name)
        abs_histogram(state["exp_avg"], shard.table, no_blocks, 1, histogram[:, :1024], backend=name)
        masked_adamw(
            state["param"],
            state["exp_avg"],
            state["exp_avg_sq"],
            shard.table,
            no_blocks,
            AdamWScalars(**UPDATE, weight_decay=0.1, decay_selected_only=True),
            backend=name,
        )
    for name in ("param", "exp_avg", "exp_avg_sq"):
        assert_close(actual[name][shard.covered], expected[name][shard.covered], name)
    assert_padding_untouched(actual, before, shard)


# ---------------------------------------------------------------------- end-to-end checks


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
    start, width = start.to(device), width.to(device)
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
    own_histogram, own_above, own_window = (
        torch.zeros_like(t) for t in (histogram, hinted.above, hinted.histogram)
    )
    starts, widths = start.tolist(), width.tolist()
    for shard_offset, length, _, _, block, _ in table.rows():
        if block == DENSE:
            continue
        bits = abs_bits(state["exp_avg"][shard_offset : shard_offset + length])
        if starts[block] < 0:
            own_histogram[block] += torch.bincount(digit_and_prefix(bits, 0)[0], minlength=level_bins(0))
            continue
        position = (bits >> HINT_SHIFT) - starts[block]  # in the window: 0 .. width - 1
        own_above[block] += int((position >= widths[block]).sum())
        inside = position[(position >= 0) & (position < widths[block])]
        own_window[block] += torch.bincount(inside, minlength=HINT_WINDOW)
    assert int(own_window.sum()) > 0 and int(own_above.sum()) > 0, "the windows must be populated"
    assert_bitwise(histogram, own_histogram, "level-0 histogram (unhinted blocks only)")
    assert_bitwise(hinted.above, own_above, "entries above the window")
    assert_bitwise(hinted.histogram, own_window, "histogram of the window")


def run_ranks(step_on_rank, ranks: int) -> list:
    """Run step_on_rank(rank, sum_over_ranks) on `ranks` threads whose sum_over_ranks adds the
    ranks' count tensors like the data-parallel all-reduce (results in rank order). One thread
    computes at a time (the Triton interpreter is not thread-safe); they meet in sum_over_ranks."""
    barrier = threading.Barrier(ranks)
    computing = threading.Lock()
    posted: list = [None] * ranks

    def sum_over_ranks_of(rank):
        def sum_over_ranks(tensors):
            posted[rank] = [t.clone() for t in tensors]
            computing.release()
            try:
                barrier.wait()
                total = [sum(parts) for parts in zip(*posted, strict=True)]
                barrier.wait()
            finally:  # body() releases it, on errors too
                computing.acquire()
            return total

        return sum_over_ranks

    results: list = [None] * ranks
    errors: list = []

    def body(rank):
        computing.acquire()
        try:
            results[rank] = step_on_rank(rank, sum_over_ranks_of(rank))
        except BaseException as error:  # reported below; the other rank is released
            errors.append(error)
            barrier.abort()
        finally:
            computing.release()

    threads = [threading.Thread(target=body, args=(rank,)) for rank in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("defer_limit", [None, 0], ids=["deferring", "no-deferral"])
@pytest.mark.parametrize(
    ("backend", "device"),
    [pytest.param("torch", "cpu", id="torch")]
    + [pytest.param(c.values[0], c.values[1], id=c.id) for c in fused_backends()],
)
def test_hinted_deferring_step_equals_the_three_pass_step(backend, device, defer_limit, monkeypatch):
    """Catches any result of topk_adamw_step that differs from the plain pipeline (moments,
    three histogram levels over m, masked update) over 6 steps on two ranks: hints that hit,
    miss (a wrong hint on purpose, thresholds crossing bins as m moves), blocks resolved early,
    deferred entries updated twice or never, ties at the threshold (deferred, or past the
    deferral limit and counted over m instead), counts not summed over ranks."""
    if defer_limit is not None:
        monkeypatch.setattr(step_op, "DEFER_LIMIT", defer_limit)
    passes: list[tuple[int, int]] = []  # (step, level) of every histogram pass over m
    count_over_m = step_op.abs_histogram

    def counted_pass(exp_avg, table, prefix, level, histogram, backend):
        passes.append((current_step, level))
        count_over_m(exp_avg, table, prefix, level, histogram, backend=backend)

    monkeypatch.setattr(step_op, "abs_histogram", counted_pass)
    generator = torch.Generator().manual_seed(21)
    tied = torch.full((2000,), 0.05) * torch.where(torch.rand(2000, generator=generator) < 0.5, -1.0, 1.0)
    tied[:200] *= 3  # 10% above, then 1800 ties: the k-th largest |m| (k = 15%) is tied
    params = [
        (torch.randn(3001, generator=generator) * 0.1, 7, 0),
        (torch.randn(64, generator=generator), 1, DENSE),
        (tied, 10, 1),
    ]
    shards, pieces = split_into_shards(params, cut=1900, device=device)
    states = [random_state(shard, seed=30 + rank) for rank, shard in enumerate(shards)]
    for index, (values, _, _) in enumerate(params):
        for rank, offset, param_offset, length in pieces[index]:
            states[rank]["exp_avg"][offset : offset + length] = values[
                param_offset : param_offset + length
            ].to(device)
    expected = [clone(state) for state in states]
    # windows of no threshold
    wrong = ThresholdHint.around(
        *(torch.tensor(v, device=device) for v in ([700 << 10, 3], [700 << 10, 3], [40, 2]))
    )
    hints = [wrong] * 2
    hyper = dict(lr=1e-2, betas=(BETA1, BETA2), eps=1e-8, weight_decay=0.1, decay_selected_only=True)
    for step in range(1, 7):
        current_step = step
        for rank, state in enumerate(states):
            # g near m (m moves ~1% a step: thresholds mostly stay in their bins); the tied block
            # gets g = m exactly and keeps its ties
            noise = torch.randn(state["grad"].shape, generator=generator).to(device) * 0.01
            fresh = state["exp_avg"] + noise
            for _, offset, _, length in (p for p in pieces[2] if p[0] == rank):
                fresh[offset : offset + length] = state["exp_avg"][offset : offset + length]
            covered = shards[rank].covered
            for tensor in (state["grad"], expected[rank]["grad"]):
                tensor[covered] = fresh[covered]

        def step_on_rank(rank, sum_over_ranks, step=step, hints=hints):
            state = states[rank]
            return topk_adamw_step(
                state["param"],
                state["grad"],
                state["exp_avg"],
                state["exp_avg_sq"],
                shards[rank].table,
                step=step,
                hint=hints[rank],
                sum_over_ranks=sum_over_ranks,
                backend=backend,
                **hyper,
            )

        hints = run_ranks(step_on_rank, 2)
        radix = select_thresholds(shards, expected, "torch")
        for shard, state in zip(shards, expected, strict=True):
            masked_adamw(
                state["param"],
                state["exp_avg"],
                state["exp_avg_sq"],
                shard.table,
                radix.threshold,
                AdamWScalars.at_step(step, **hyper),
                backend="torch",
            )
        for rank in range(2):
            expected_prefix = radix.threshold >> HINT_SHIFT
            assert_bitwise(hints[rank].prefix, expected_prefix, f"step {step} rank {rank} hints")
            for name in ("exp_avg", "exp_avg_sq", "param"):
                assert_close(states[rank][name], expected[rank][name], f"step {step} rank {rank} {name}")
            assert_padding_untouched(states[rank], expected[rank], shards[rank])
    levels_by_step = {step: sorted({level for s, level in passes if s == step}) for step in range(1, 7)}
    assert levels_by_step[1][:2] == [0, 1], "the wrong hints of step 1 must be counted again over m"
    assert any(1 not in levels for levels in levels_by_step.values()), "no hint ever hit"
    defers = defer_limit is None
    assert all(2 not in levels for levels in levels_by_step.values()) == defers, levels_by_step


def split_into_shards(params: list[tuple[torch.Tensor, int, int]], cut: int, device: str):
    """ZeRO-1/2 style: parameters concatenated, the flat vector cut at `cut` into two ranks'
    shards (a parameter straddles the cut), each shard padded by 3 elements in front and 5 at
    the end. params: (values, row_len, block). Returns the shards and, per parameter, its
    pieces as (rank, shard offset, parameter offset, length)."""
    flat_len = sum(values.numel() for values, _, _ in params)
    bounds = [(0, cut), (cut, flat_len)]
    shards, pieces = [], [[] for _ in params]
    for rank, (start, stop) in enumerate(bounds):
        rows, position = [], 0
        for index, (values, row_len, block) in enumerate(params):
            begin, end = max(start, position), min(stop, position + values.numel())
            if begin < end:
                rows.append((3 + begin - start, end - begin, begin - position, row_len, block, NO_ROWSCALE))
                pieces[index].append((rank, 3 + begin - start, begin - position, end - begin))
            position += values.numel()
        numel = 3 + stop - start + 5
        covered = torch.zeros(numel, dtype=torch.bool)
        covered[3 : 3 + stop - start] = True
        block_k = [
            max(1, math.floor(0.15 * values.numel()))
            for values, _, block in sorted(params, key=lambda p: p[2])
            if block >= 0
        ]
        shards.append(
            Shard(SegmentTable.build(rows, None, block_k, device=device), numel, covered.to(device))
        )
    return shards, pieces


@pytest.mark.parametrize(
    ("backend", "device"),
    [pytest.param("torch", "cpu", id="torch")]
    + [pytest.param(c.values[0], c.values[1], id=c.id) for c in fused_backends()],
)
def test_three_ops_select_exactly_the_per_block_topk(backend, device):
    """Catches any disagreement between the radix pipeline (moments + level-0 histogram,
    refinement levels, masked update) and per-block torch.topk: off-by-one in k, ties at the
    k-th value not all selected, histograms not summed across ranks, a block's threshold taken
    from its shard instead of the whole block."""
    generator = torch.Generator().manual_seed(11)
    # block 1 is built with ties: 10% well above c, 20% exactly +-c, 70% below c/2, and g = m so
    # the update leaves m exactly as built; its k-th largest |m| (15%) is c, tied 20% deep.
    n_tied = 2000
    order = torch.randperm(n_tied, generator=generator)
    tied = torch.empty(n_tied)
    c = 0.05
    tied[order[:200]] = c * (2 + torch.rand(200, generator=generator))
    tied[order[200:600]] = c
    tied[order[600:]] = c * 0.5 * torch.rand(1400, generator=generator)
    tied *= torch.where(torch.rand(n_tied, generator=generator) < 0.5, -1.0, 1.0)
    params = [
        (torch.randn(3001, generator=generator) * 0.1, 7, 0),  # random block, cut mid-row
        (torch.randn(64, generator=generator), 1, DENSE),  # a norm
        (tied, 10, 1),
    ]
    shards, pieces = split_into_shards(params, cut=1900, device=device)
    states = [random_state(shard, seed=12 + rank) for rank, shard in enumerate(shards)]
    for index, (values, _, _) in enumerate(params):
        for rank, offset, param_offset, length in pieces[index]:
            piece = values[param_offset : param_offset + length].to(device)
            states[rank]["exp_avg"][offset : offset + length] = piece
            if index == 2:
                states[rank]["grad"][offset : offset + length] = piece
    before = [clone(state) for state in states]

    levels_seen: list[int] = []
    radix = select_thresholds(shards, states, backend, levels_seen)
    for shard, state in zip(shards, states, strict=True):
        masked_adamw(
            state["param"],
            state["exp_avg"],
            state["exp_avg_sq"],
            shard.table,
            radix.threshold,
            AdamWScalars(**UPDATE, weight_decay=0.0, decay_selected_only=False),
            backend=backend,
        )

    assert levels_seen == [0, 1, 2], "the tied block needs all three levels"
    for index, (values, _, block) in enumerate(params):
        m = torch.cat([states[rank]["exp_avg"][o : o + n] for rank, o, _, n in pieces[index]]).cpu()
        moved = torch.cat(
            [(states[rank]["param"] != before[rank]["param"])[o : o + n] for rank, o, _, n in pieces[index]]
        ).cpu()
        if block == DENSE:
            assert moved.all()
            continue
        k = max(1, math.floor(0.15 * values.numel()))
        kth = torch.topk(m.abs(), k).values.min()
        expected = m.abs() >= kth
        assert_bitwise(moved, expected, f"block {block} selection")
        # a block resolved early gets the start of the k-th value's bin, never more
        assert int(radix.threshold[block]) <= int(abs_bits(kth.reshape(1))), f"block {block} threshold"
        if index == 2:
            assert int(radix.threshold[block]) == int(abs_bits(kth.reshape(1))), "tied block: exact threshold"
            assert int(expected.sum()) == 600 > k, "every tie at the k-th value is selected"
    for shard, state, old in zip(shards, states, before, strict=True):
        assert_padding_untouched(state, old, shard)


@pytest.mark.parametrize(("backend", "device", "size"), fused_backends())
def test_fraction_one_equals_torch_adamw(backend, device, size):
    """Catches any drift from torch.optim.AdamW's formula (lerp form, bias corrections, eps
    outside the sqrt, decoupled decay order) when every entry is selected (k = n)."""
    rows = [(2, 1500, 3, 9, 0, NO_ROWSCALE), (1505, 700, 0, 1, DENSE, NO_ROWSCALE)]
    covered = torch.zeros(2210, dtype=torch.bool)
    for offset, length, *_ in rows:
        covered[offset : offset + length] = True
    table = SegmentTable.build(rows, None, [1500], device=device)  # k = n: fraction 1
    shard = Shard(table, 2210, covered.to(device))
    state = random_state(shard, seed=13)
    param = torch.nn.Parameter(state["param"].clone())
    param.grad = state["grad"].clone()
    reference = torch.optim.AdamW(
        [param], lr=1e-2, betas=(BETA1, BETA2), eps=1e-8, weight_decay=0.1, foreach=False
    )
    reference.state[param] = {
        "step": torch.tensor(4.0),
        "exp_avg": state["exp_avg"].clone(),
        "exp_avg_sq": state["exp_avg_sq"].clone(),
    }
    reference.step()
    radix = select_thresholds([shard], [state], backend)
    masked_adamw(
        state["param"],
        state["exp_avg"],
        state["exp_avg_sq"],
        table,
        radix.threshold,
        AdamWScalars(**UPDATE, weight_decay=0.1, decay_selected_only=False),
        backend=backend,
    )
    covered = shard.covered
    assert_close(state["param"][covered], param.detach()[covered], "param vs torch.optim.AdamW", atol=1e-6)


@pytest.mark.parametrize(("backend", "device", "size"), fused_backends())
def test_results_do_not_depend_on_the_layout(backend, device, size):
    """Catches rounding that depends on an element's position (a vectorised body and a scalar
    tail computing differently, tile- or thread-dependent paths): one parameter as one segment
    and as three pieces at odd offsets in another shard must give identical bits, or exact-mode
    selection would change with the number of ranks."""
    generator = torch.Generator().manual_seed(14)
    n, row_len = 3001, 13
    g, m = torch.randn(n, generator=generator), torch.randn(n, generator=generator) * 0.1
    v, p = torch.rand(n, generator=generator) * 0.01 + 1e-4, torch.randn(n, generator=generator)
    scales = torch.rand(n // row_len + 1, generator=generator) + 0.5
    layouts = {
        "whole": [(0, n, 0)],
        "pieces": [(5, 1001, 0), (1013, 777, 1001), (1797, n - 1778, 1778)],
    }
    results = {}
    for name, pieces in layouts.items():
        rows = [(offset, length, start, row_len, 0, 0) for offset, length, start in pieces]
        numel = max(offset + length for offset, length, _ in pieces) + 3
        table = SegmentTable.build(rows, scales, [450], device=device)
        buffers = [torch.zeros(numel, device=device) for _ in range(4)]
        for offset, length, start in pieces:
            for buffer, values in zip(buffers, (g, m, v, p), strict=True):
                buffer[offset : offset + length] = values[start : start + length].to(device)
        grad, exp_avg, exp_avg_sq, param = buffers
        histogram = torch.zeros(1, level_bins(0), dtype=torch.int64, device=device)
        update_moments(
            grad, exp_avg, exp_avg_sq, table, beta1=BETA1, beta2=BETA2, histogram=histogram, backend=backend
        )
        thresholds = torch.tensor(
            [int(abs_bits(exp_avg[exp_avg != 0].abs().median().reshape(1)))], device=device
        )
        masked_adamw(
            param,
            exp_avg,
            exp_avg_sq,
            table,
            thresholds,
            AdamWScalars(**UPDATE, weight_decay=0.1, decay_selected_only=False),
            backend=backend,
        )
        gather = [
            torch.cat([b[o : o + length] for o, length, _ in pieces]) for b in (exp_avg, exp_avg_sq, param)
        ]
        results[name] = (*gather, histogram, thresholds)
    for what, whole, split in zip(
        ("exp_avg", "exp_avg_sq", "param", "histogram", "threshold"), *results.values(), strict=True
    ):
        assert_bitwise(split, whole, what)


# ------------------------------------------------------------------ backends and validation


def test_backend_choice_per_device():
    """Catches the slow interpreter or the references being picked by default, and a CPU
    default that depends on Triton being installed."""
    cpu = available_backends("cpu")
    assert cpu[:2] == ["torch", "cpu"]
    assert default_backend("cpu") == "cpu"
    assert ("triton" in cpu) == (INTERPRET and triton is not None)
    expected_cuda = "triton" if triton_usable(torch.device("cuda")) else "torch"
    assert default_backend("cuda") == expected_cuda


@pytest.mark.parametrize("op", ["update_moments", "abs_histogram", "masked_adamw"])
def test_unknown_or_unusable_backend_is_a_clear_error(op):
    """Catches a typo silently running the slow reference, or Triton launched on CPU tensors
    without the interpreter; the message must name the op and the usable backends."""
    shard = build_shard([(100, 0, 10, 0, False)], "cpu")
    state = random_state(shard, seed=15)
    calls = {
        "update_moments": lambda backend: update_moments(
            state["grad"],
            state["exp_avg"],
            state["exp_avg_sq"],
            shard.table,
            beta1=BETA1,
            beta2=BETA2,
            backend=backend,
        ),
        "abs_histogram": lambda backend: abs_histogram(
            state["exp_avg"],
            shard.table,
            torch.zeros(1, dtype=torch.int64),
            0,
            torch.zeros(1, level_bins(0), dtype=torch.int64),
            backend=backend,
        ),
        "masked_adamw": lambda backend: masked_adamw(
            state["param"],
            state["exp_avg"],
            state["exp_avg_sq"],
            shard.table,
            torch.zeros(1, dtype=torch.int64),
            AdamWScalars(**UPDATE, weight_decay=0.0, decay_selected_only=False),
            backend=backend,
        ),
    }
    with pytest.raises(ValueError, match=rf"{op}: backend 'cuda' is not available .*\['torch', 'cpu'"):
        calls[op]("cuda")
    if not INTERPRET:
        with pytest.raises(ValueError, match=rf"{op}: backend 'triton' is not available for cpu tensors"):
            calls[op]("triton")


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


def test_wrong_buffers_are_refused():
    """Catches float64 state, non-contiguous views and wrong histogram shapes reaching the C++
    kernels, which read raw memory as fp32/int64."""
    shard = build_shard([(100, 0, 10, 0, False)], "cpu")
    state = random_state(shard, seed=16)
    common = dict(beta1=BETA1, beta2=BETA2, backend="cpu")
    with pytest.raises(ValueError, match="exp_avg has dtype torch.float64"):
        update_moments(state["grad"], state["exp_avg"].double(), state["exp_avg_sq"], shard.table, **common)
    with pytest.raises(ValueError, match="exp_avg_sq has shape"):
        strided = torch.rand(2 * shard.numel)[::2]
        update_moments(state["grad"], state["exp_avg"], strided, shard.table, **common)
    with pytest.raises(ValueError, match=r"histogram must be a contiguous int64 tensor of shape \(1, 2048\)"):
        histogram = torch.zeros(1, 1024, dtype=torch.int64)
        update_moments(
            state["grad"], state["exp_avg"], state["exp_avg_sq"], shard.table, histogram=histogram, **common
        )


# ------------------------------------------------------------------------- subprocess runs


def run_python(args: list[str], env: dict[str, str] | None = None, timeout: int = 240):
    result = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return result


def test_import_needs_neither_triton_nor_a_gpu():
    """Catches a module that imports triton unguarded: dsforget must import, pick the CPU
    backend and run it where Triton is absent."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, dsforget.kernels as k\n"
        "assert k.available_backends('cpu') == ['torch', 'cpu'], k.available_backends('cpu')\n"
        "assert k.default_backend('cuda') == 'torch'\n"
        "t = k.SegmentTable.build([(1, 5, 0, 1, k.DENSE, k.NO_ROWSCALE)], None, [])\n"
        "m, v = torch.zeros(7), torch.zeros(7)\n"
        "k.update_moments(torch.ones(7), m, v, t, beta1=0.9, beta2=0.999, backend='cpu')\n"
        "assert m[1:6].eq(0.1).all() and m[0] == 0 and m[6] == 0, m\n"
    )
    run_python(["-c", code], env={"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""})


def test_top_level_kernels_name_is_left_to_its_package():
    """Catches the checkout's kernels/ folder shadowing Hugging Face's `kernels` package when
    the checkout's root is on sys.path (python -m from it): transformers >= 5.25 imports that
    package while loading any model, and every model load from the root failed."""
    code = (
        "import importlib.metadata as metadata, pathlib, sys\n"
        "try:\n"
        "    metadata.version('kernels')\n"
        "except metadata.PackageNotFoundError:\n"
        "    try:\n"
        "        import kernels\n"
        "    except ModuleNotFoundError as error:\n"
        "        assert 'dsforget.kernels' in str(error), error\n"
        "    else:\n"
        "        raise AssertionError(f'imported {kernels.__file__}')\n"
        "else:\n"
        "    import kernels\n"
        "    assert pathlib.Path(sys.path[0] or '.').resolve() == pathlib.Path.cwd(), sys.path[0]\n"
        "    folder = pathlib.Path(kernels.__file__).resolve().parent\n"
        "    assert folder != pathlib.Path.cwd() / 'kernels', folder\n"
        "    import transformers.modeling_utils\n"
        "import dsforget.kernels as ours\n"
        "assert ours.topk_adamw_step.__module__ == 'dsforget.kernels.step', ours.topk_adamw_step.__module__\n"
    )
    run_python(["-c", code])


@pytest.mark.skipif(triton is None, reason="Triton is not installed")
@pytest.mark.skipif(INTERPRET, reason="already running under the interpreter")
def test_triton_kernels_under_the_interpreter():
    """Runs every triton case of this file with TRITON_INTERPRET=1 (see the module docstring):
    catches kernels that only a GPU machine would otherwise ever execute."""
    result = run_python(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton-interpret", str(Path(__file__))],
        env={"TRITON_INTERPRET": "1"},
    )
    assert " passed" in result.stdout and "failed" not in result.stdout, result.stdout[-3000:]


FP32_POINTERS = {
    "grad_ptr",
    "exp_avg_ptr",
    "exp_avg_sq_ptr",
    "rowscale_ptr",
    "param_ptr",
    "deferred_exp_avg_ptr",
    "deferred_exp_avg_sq_ptr",
}
INT_SCALARS = {"defer_capacity"}


@pytest.mark.skipif(triton is None, reason="Triton is not installed")
@pytest.mark.skipif(INTERPRET, reason="interpreted kernels cannot be compiled")
def test_triton_kernels_compile_for_h100():
    """Catches kernels that run in the interpreter but not compiled (a runtime `if` whose
    branches disagree on types, int64 atomics, sqrt_rn/div_rn, pointer arithmetic): every
    specialisation the launchers use is compiled ahead of time for sm_90 down to a cubin with
    Triton's bundled ptxas; no GPU needed."""
    from dsforget.kernels import histogram as histogram_op
    from dsforget.kernels import masked_update as masked_op
    from dsforget.kernels import moments as moments_op
    from dsforget.kernels import radix as radix_op
    from dsforget.kernels._triton import LAUNCH_OPTIONS
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_kernel(kernel, constexprs: dict, grad_type: str = "*fp32") -> None:
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name == "grad_ptr":
                signature[name] = grad_type
            elif name.endswith("_ptr"):
                signature[name] = "*fp32" if name in FP32_POINTERS else "*i64"
            elif name in INT_SCALARS:
                signature[name] = "i64"
            else:
                signature[name] = "fp32"
        indexed = {(i,): constexprs[name] for i, name in enumerate(kernel.arg_names) if name in constexprs}
        source = ASTSource(kernel, signature, constexprs=indexed)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=LAUNCH_OPTIONS)
        assert compiled.asm["cubin"], kernel

    level0 = dict(DIGIT_SHIFT=LEVELS[0][0], BINS=level_bins(0), TILE=moments_op.TRITON_TILE)
    hints = dict(HINT_SHIFT=HINT_SHIFT, HINT_WINDOW=HINT_WINDOW)
    for grad_type in ("*fp32", "*bf16"):
        for with_histogram, hinted in ((True, True), (True, False), (False, True), (False, False)):
            constexprs = dict(level0, **hints, HISTOGRAM=with_histogram, HINT=hinted)
            compile_kernel(moments_op._update_moments_kernel, constexprs, grad_type)
    for level, (shift, width) in enumerate(LEVELS):
        constexprs = dict(
            DIGIT_SHIFT=shift,
            BINS=level_bins(level),
            PREFIX_SHIFT=shift + width,
            TILE=histogram_op.TRITON_TILE,
        )
        compile_kernel(histogram_op._abs_histogram_kernel, constexprs)
    for defer in (False, True):
        constexprs = dict(DEFER_SHIFT=DEFER_SHIFT, DEFER=defer, TILE=masked_op.TRITON_TILE)
        compile_kernel(masked_op._masked_adamw_kernel, constexprs)
    for level, (shift, _) in enumerate(LEVELS):
        for masked in (False, True):
            constexprs = dict(
                BINS=level_bins(level), SHIFT=shift, LAST=level == NUM_LEVELS - 1, MASKED=masked
            )
            compile_kernel(radix_op._advance_kernel, constexprs)


def test_benchmark_tiny_run(tmp_path):
    """Keeps `python -m dsforget.kernels.bench` from rotting: every implementation runs (or is
    reported unavailable with a reason), the fused step matches the reference, the CSV is written.
    On a machine where DeepSpeed's cpu_adam op was never built, building it adds ~95 s (2 cores)."""
    output = tmp_path / "bench.csv"
    result = run_python(["-m", "dsforget.kernels.bench", "--tiny", "--csv", str(output)])
    assert "| dsforget-cpu |" in result.stdout, result.stdout
    with open(output, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    names = [row["implementation"] for row in rows]
    assert names[:3] == ["mofo-reference", "dsforget-torch", "dsforget-cpu"]
    for row in rows:
        assert row["status"] == "ok" or row["status"].startswith("unavailable: "), row
        assert row["device"] and row["torch"] and row["deepspeed"]
    fused = next(row for row in rows if row["implementation"] == "dsforget-cpu")
    assert fused["status"] == "ok" and float(fused["max_abs_error"]) < 1e-6, fused


def test_model_benchmark_tiny_run():
    """Keeps `python -m dsforget.kernels.bench_model` from rotting: MoFO and torch's fused AdamW
    step a whole (tiny) Llama's parameters and get a time; baselines that cannot run say why."""
    result = run_python(["-m", "dsforget.kernels.bench_model", "--tiny"])
    rows = {
        cells[0]: cells[1:]
        for line in result.stdout.splitlines()
        if line.startswith("| ") and not line.startswith(("| implementation", "| ---"))
        for cells in [[cell.strip() for cell in line.strip("|").split("|")]]
    }
    backend = default_backend(torch.device("cpu"))
    for name in (f"mofo-{backend}", "torch-adamw-fused"):
        assert float(rows[name][0]) > 0, result.stdout
    assert len(rows) == 4 and all(
        cells[0].replace(".", "", 1).isdigit() or cells[0].startswith("unavailable: ")
        for cells in rows.values()
    ), result.stdout


# ------------------------------------------------------------------- the one-pass (speculative) step


def speculation_spy(monkeypatch) -> dict[str, list]:
    """Records what every speculative_update left and every correct_speculation call of the step."""
    seen: dict[str, list] = {"left": [], "corrected": []}
    speculate, correct = step_op.speculative_update, step_op.correct_speculation

    def spied_update(*args, **kwargs):
        left = speculate(*args, **kwargs)
        seen["left"].append(left)
        return left

    def spied_correct(*args, **kwargs):
        seen["corrected"].append(True)
        correct(*args, **kwargs)

    monkeypatch.setattr(step_op, "speculative_update", spied_update)
    monkeypatch.setattr(step_op, "correct_speculation", spied_correct)
    return seen


def shifted(hint: ThresholdHint, by: int) -> ThresholdHint:
    """The hint with its window moved by `by` level-1 prefixes (a window of no threshold)."""
    return ThresholdHint.around(hint.prefix, hint.center + by, hint.reach)


@pytest.mark.parametrize("limits", ["roomy", "tight"])
@pytest.mark.parametrize("window", ["settled", "above-threshold", "below-threshold"])
@pytest.mark.parametrize(("scope", "weight_decay"), [("all", 0.1), ("selected", 0.0), ("selected", 0.1)])
def test_speculative_step_equals_the_two_pass_step(window, limits, scope, weight_decay, monkeypatch):
    """Catches any bit in which the one-pass step differs from the two-pass step, on two ranks of
    a ZeRO-1/2-style split over 4 steps: window entries updated twice or never, a wrong window
    (every entry below it but above the threshold left out, or every entry above it but below the
    threshold kept), a rollback that does not restore p exactly (a block of tiny |p| whose updates
    cannot be undone by subtraction), ties at the threshold, lists past their bound (tight limits:
    pieces left untouched and updated after the threshold is known), and speculation where
    selected and unselected entries decay differently (it must not run then)."""
    # roomy: room for every entry of a block; tight: for 40 (most pieces are left untouched)
    monkeypatch.setattr(speculative_op, "LISTED_MIN", 40)
    monkeypatch.setattr(speculative_op, "LISTED_SHARE", 1 if limits == "roomy" else 10**9)
    seen = speculation_spy(monkeypatch)
    generator = torch.Generator().manual_seed(5)
    tied = torch.full((2000,), 0.05) * torch.where(torch.rand(2000, generator=generator) < 0.5, -1.0, 1.0)
    tied[:200] *= 3  # 10% above, then 1800 ties: the k-th largest |m| (k = 15%) is tied
    params = [
        (torch.randn(3001, generator=generator) * 0.1, 7, 0),
        (torch.randn(64, generator=generator), 1, DENSE),
        (tied, 10, 1),
        (torch.randn(2500, generator=generator) * 0.1, 50, 2),  # its p is made tiny below
    ]
    shards, pieces = split_into_shards(params, cut=4100, device="cpu")
    one_pass = [random_state(shard, seed=50 + rank) for rank, shard in enumerate(shards)]
    for index, (values, _, _) in enumerate(params):
        for rank, offset, param_offset, length in pieces[index]:
            one_pass[rank]["exp_avg"][offset : offset + length] = values[param_offset : param_offset + length]
            if index == 3:  # |p| ~ 1e-7 against steps of ~1e-2: most selected updates lose p's bits
                one_pass[rank]["param"][offset : offset + length] *= 1e-7
    two_pass = [clone(state) for state in one_pass]
    hyper = dict(lr=1e-2, betas=(BETA1, BETA2), eps=1e-8, weight_decay=weight_decay)
    hyper["decay_selected_only"] = scope == "selected"
    hints = [None, None]
    for step in range(1, 5):
        for rank in range(2):
            noise = torch.randn(one_pass[rank]["grad"].shape, generator=generator) * 0.01
            fresh = one_pass[rank]["exp_avg"] + noise
            for _, offset, _, length in (p for p in pieces[2] if p[0] == rank):
                fresh[offset : offset + length] = one_pass[rank]["exp_avg"][offset : offset + length]
            covered = shards[rank].covered
            for state in (one_pass[rank], two_pass[rank]):
                state["grad"][covered] = fresh[covered]
        if window != "settled" and hints[0] is not None:
            # 3000 prefixes: ~20% of |m|, far past the widest window
            hints = [shifted(hint, 3000 if window == "above-threshold" else -3000) for hint in hints]

        def step_on_rank(rank, sum_over_ranks, states, speculate, step=step, hints=hints):
            state = states[rank]
            return topk_adamw_step(
                state["param"],
                state["grad"],
                state["exp_avg"],
                state["exp_avg_sq"],
                shards[rank].table,
                step=step,
                hint=hints[rank],
                sum_over_ranks=sum_over_ranks,
                backend="cpu",
                speculate=speculate,
                **hyper,
            )

        new_hints = run_ranks(lambda rank, total: step_on_rank(rank, total, one_pass, True), 2)
        expected_hints = run_ranks(lambda rank, total: step_on_rank(rank, total, two_pass, False), 2)
        for rank in range(2):
            for name in ("prefix", "center", "reach"):
                assert_bitwise(getattr(new_hints[rank], name), getattr(expected_hints[rank], name), name)
            for name in ("exp_avg", "exp_avg_sq", "param"):
                assert_bitwise(one_pass[rank][name], two_pass[rank][name], f"step {step} rank {rank} {name}")
        hints = new_hints
    speculated = not (scope == "selected" and weight_decay > 0)
    assert len(seen["left"]) == (6 if speculated else 0), "steps 2-4 of both ranks speculate iff decay allows"
    if not speculated:
        return
    if limits == "roomy":
        assert all(left.deferred.index.numel() > 0 for left in seen["left"]), "every window holds entries"
    assert bool(seen["corrected"]) == (window != "settled"), "corrections run iff a window missed"
    untouched = sum(left.untouched.shape[0] for left in seen["left"])
    assert (untouched > 0) == (limits == "tight"), f"{untouched} untouched spans"
    if window == "below-threshold" and limits == "roomy":
        assert sum(left.rollback_index.numel() for left in seen["left"]) > 100, "rollbacks must be exercised"


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("limits", ["roomy", "tight", "zero-denominators"])
def test_speculative_step_on_a_large_shard(grad_dtype, limits, monkeypatch):
    """Catches disagreements that need threads (blocks split between threads' ranges mid-piece),
    row scales, bf16 gradients and the torch reference: the one-pass step equals the two-pass
    step bit for bit, and the plain-PyTorch pipeline to float tolerance. zero-denominators: eps 0
    and entries whose v stays 0 (their update is NaN: their pieces must be left to the two-pass
    update, which gives NaN exactly where it does)."""
    monkeypatch.setattr(speculative_op, "LISTED_MIN", 500)
    monkeypatch.setattr(speculative_op, "LISTED_SHARE", 10**9 if limits == "tight" else 1)
    seen = speculation_spy(monkeypatch)
    shard = build_shard(LARGE_LAYOUT, "cpu", seed=3)
    states = {name: random_state(shard, seed=8, grad_dtype=grad_dtype) for name in ("one", "two", "torch")}
    eps = 0.0 if limits == "zero-denominators" else 1e-8
    hyper = dict(lr=1e-3, betas=(BETA1, BETA2), eps=eps, weight_decay=0.01, decay_selected_only=False)
    silent = torch.arange(5000, 5050) if limits == "zero-denominators" else torch.arange(0)  # in block 0
    for state in states.values():
        state["exp_avg_sq"][silent] = 0.0
    generator = torch.Generator().manual_seed(9)
    hints: dict[str, ThresholdHint | None] = dict.fromkeys(states)
    for step in range(1, 5):
        noise = torch.randn(shard.numel, generator=generator) * 0.02
        for state in states.values():
            fresh = (states["one"]["exp_avg"] + noise).to(grad_dtype)
            state["grad"][shard.covered] = fresh[shard.covered]
            state["grad"][silent] = 0.0
        for name, state in states.items():
            hints[name] = topk_adamw_step(
                state["param"],
                state["grad"],
                state["exp_avg"],
                state["exp_avg_sq"],
                shard.table,
                step=step,
                hint=hints[name],
                backend="torch" if name == "torch" else "cpu",
                speculate=name == "one",
                **hyper,
            )
        for name in ("exp_avg", "exp_avg_sq", "param"):
            assert_bitwise(states["one"][name], states["two"][name], f"step {step} {name}")
            assert_close(states["one"][name], states["torch"][name], f"step {step} {name} against torch")
        assert_padding_untouched(states["one"], states["torch"], shard)
    assert len(seen["left"]) == 3
    untouched = sum(left.untouched.shape[0] for left in seen["left"])
    assert (untouched > 0) == (limits != "roomy"), f"{untouched} untouched spans"
    if limits == "zero-denominators":
        assert not states["one"]["param"][silent].isfinite().any(), "x/0 updates: the test must reach them"


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
