"""`masked_adamw` and `apply_deferred`: the masked AdamW update of every backend against the
reference, deferral, no-op cases.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import pytest
import torch
from dsforget.kernels import DENSE, abs_histogram, level_bins, update_moments
from dsforget.kernels.masked_update import DEFER_SHIFT, NO_DEFERRAL, AdamWScalars
from dsforget.kernels.radix import abs_bits
from helpers import (
    BETA1,
    BETA2,
    LAYOUTS,
    UPDATE,
    Shard,
    assert_bitwise,
    assert_close,
    assert_padding_untouched,
    build_shard,
    clone,
    fused_backends,
    masked_adamw_on,
    random_state,
)


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
        masked_adamw_on(state, shard.table, thresholds, scalars, name)
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
        deferred = masked_adamw_on(
            state,
            shard.table,
            passed,
            scalars,
            backend_name,
            defer_prefix=defer_prefix,
            defer_capacity=capacity,
        )
        return state, deferred

    (expected, listed), (actual, got) = (update(name, shard.covered.numel()) for name in ("torch", backend))
    assert listed.index.numel() > 0, "nothing deferred: the test checks nothing"
    if backend == "triton":  # listed in slot order, at its capacity, the count on the device
        assert got.count is not None and got.index.numel() == shard.covered.numel()
        got = got.compacted()
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
    masked_adamw_on(
        after,
        shard.table,
        thresholds,
        AdamWScalars(**UPDATE, weight_decay=0.0, decay_selected_only=False),
        backend,
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
        masked_adamw_on(
            state,
            shard.table,
            no_blocks,
            AdamWScalars(**UPDATE, weight_decay=0.1, decay_selected_only=True),
            name,
        )
    for name in ("param", "exp_avg", "exp_avg_sq"):
        assert_close(actual[name][shard.covered], expected[name][shard.covered], name)
    assert_padding_untouched(actual, before, shard)
