"""Per-counter bias corrections: segments of one shard whose moments have seen different numbers
of updates (HFT resampling holds some parameters while others train) are each corrected by their
own count, in every op of every backend; equal counts give the uniform step bit for bit.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dsforget.kernels import DENSE, SegmentTable, topk_adamw_step
from dsforget.kernels.masked_update import AdamWScalars, CounterCorrections
from helpers import (
    BETA1,
    BETA2,
    LAYOUTS,
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
from test_masked_update import thresholds_with_ties

# 1-based counts of counters 0..3: a count of 1 (just activated), 1000 (never held), and two between
COUNTS = [3, 1000, 1, 40]
HYPER = dict(lr=1e-2, betas=(BETA1, BETA2), eps=1e-8, weight_decay=0.1, decay_selected_only=False)


def counter_of(block: int, index: int) -> int:
    """Block b's segments follow counter b % 4 (a block lies in one parameter: one counter); DENSE
    segments alternate between counters 1 and 2."""
    return block % 4 if block != DENSE else 1 + index % 2


def counted_shard(size: str, device: str, seed: int = 5) -> Shard:
    shard = build_shard(LAYOUTS[size], device, seed=seed)
    rows = shard.table.rows()
    counters = [counter_of(row[4], index) for index, row in enumerate(rows)]
    table = SegmentTable.build(rows, shard.table.rowscale, shard.table.block_k.tolist(), device, counters)
    return dataclasses.replace(shard, table=table)


def only_counter(table: SegmentTable, counter: int) -> SegmentTable:
    """The table's segments of one counter (same blocks)."""
    pairs = zip(table.rows(), table.counter.tolist(), strict=True)
    rows = [row for row, c in pairs if c == counter]
    return SegmentTable.build(
        rows, table.rowscale, table.block_k.tolist(), table.length.device, [counter] * len(rows)
    )


@pytest.mark.parametrize(("backend", "device", "size"), fused_backends(include_large=True))
def test_masked_adamw_corrects_each_segment_by_its_own_count(backend, device, size):
    """Catches a kernel that bias-corrects every segment of a shard by one step count (the shard's)
    when the table's counters have different counts, or reads the wrong counter's constants: each
    segment's update must equal the reference update of that segment alone at its own step."""
    shard = counted_shard(size, device)
    before = random_state(shard, seed=6)
    thresholds = thresholds_with_ties(before, shard)
    scalars = AdamWScalars.at_counts(COUNTS, shard.table, **HYPER)
    assert scalars.per_counter is not None
    expected, reference, actual = clone(before), clone(before), clone(before)
    for counter, count in enumerate(COUNTS):
        uniform = AdamWScalars.at_step(count, **HYPER)
        assert uniform == scalars.for_counter(counter)
        part = only_counter(shard.table, counter)
        masked_adamw_on(expected, part, thresholds, uniform, "torch")
    for state, name in ((reference, "torch"), (actual, backend)):
        masked_adamw_on(state, shard.table, thresholds, scalars, name)
    covered = shard.covered
    assert_bitwise(reference["param"], expected["param"], "torch reference, per counter")
    assert_close(actual["param"][covered], expected["param"][covered], "param")
    assert (actual["param"] != before["param"])[covered].any()
    assert_padding_untouched(actual, before, shard)


@pytest.mark.parametrize(("backend", "device", "size"), fused_backends())
def test_per_counter_constants_equal_the_scalar_ones_bit_for_bit(backend, device, size):
    """Catches per-counter constants rounded differently from the scalar arguments (the kernels'
    per-segment path must give the uniform step exactly when every counter has the step's count;
    the optimizer then takes the scalar path, but a resumed or distributed run may mix them)."""
    shard = counted_shard(size, device)
    before = random_state(shard, seed=8)
    thresholds = thresholds_with_ties(before, shard)
    uniform = AdamWScalars.at_step(7, **HYPER)
    corrections = CounterCorrections(
        ((1 - BETA1**7, 1 - BETA2**7),) * 4, tuple(shard.table.block_counter.tolist())
    )
    per_counter = dataclasses.replace(uniform, per_counter=corrections)
    scalar_path, counter_path = clone(before), clone(before)
    for state, scalars in ((scalar_path, uniform), (counter_path, per_counter)):
        masked_adamw_on(state, shard.table, thresholds, scalars, backend)
    assert_bitwise(counter_path["param"], scalar_path["param"], "param")
    assert not torch.equal(counter_path["param"], before["param"])


STEP_CASES = [pytest.param("torch", "cpu", True, 0, id="torch")] + [
    pytest.param(*case.values[:2], speculate, shift, id=f"{case.id}-{label}")
    for case in fused_backends()
    for speculate, shift, label in (
        (True, 0, "settled"),
        (True, 3000, "window-above"),
        (True, -3000, "window-below"),
        (False, 0, "two-pass"),
    )
    if case.values[0] == "cpu" or label == "settled"
]


@pytest.mark.parametrize(("backend", "device", "speculate", "shift"), STEP_CASES)
def test_step_with_mixed_counts_is_each_counters_own_step(backend, device, speculate, shift):
    """The whole step (moments, selection, deferral, and on the CPU the one-pass update with its
    window, rollbacks and corrections) with counters of different counts: each segment must end
    bit for bit where the same step with its counter's count for every segment leaves it (the
    moments and the selection do not depend on counts). Catches an op of the step (apply_deferred,
    resolve_window, correct_speculation, speculative_update, masked_adamw) that takes the shard's
    constants instead of the segment's or block's."""
    from dsforget.kernels import ThresholdHint

    shard = counted_shard("small", device, seed=11)
    start = random_state(shard, seed=12)
    generator = torch.Generator().manual_seed(13)
    # block 0 (counter 0) tied: 10% of |m| at 0.15, the rest at 0.05, so its k-th largest |m| is
    # tied and its threshold's last bin is deferred (apply_deferred, or the one-pass lists)
    tied = torch.zeros(shard.numel, dtype=torch.bool, device=device)
    for offset, length, _, _, block, _ in shard.table.rows():
        if block == 0:
            tied[offset : offset + length] = True
    values = torch.full((int(tied.sum()),), 0.05) * torch.where(
        torch.rand(int(tied.sum()), generator=generator) < 0.5, -1.0, 1.0
    )
    values[: values.numel() // 10] *= 3
    start["exp_avg"][tied] = values.to(device)
    mixed = clone(start)
    per_count = [clone(start) for _ in COUNTS]
    hints: dict[int, ThresholdHint | None] = {}
    for step in range(4):
        noise = (torch.randn(shard.numel, generator=generator) * 0.05).to(device)
        noise[tied] = 0.0  # g = m keeps the ties
        counts = [count + step for count in COUNTS]
        for key, state, step_arg in [("mixed", mixed, counts)] + [
            (c, per_count[c], counts[c]) for c in range(len(COUNTS))
        ]:
            state["grad"][shard.covered] = (state["exp_avg"] + noise)[shard.covered]
            hint = hints.get(key)
            if hint is not None and shift:
                hint = ThresholdHint.around(hint.prefix, hint.center + shift, hint.reach)
            hints[key] = topk_adamw_step(
                state["param"],
                state["grad"],
                state["exp_avg"],
                state["exp_avg_sq"],
                shard.table,
                step=step_arg,
                hint=hint,
                backend=backend,
                speculate=speculate,
                **HYPER,
            )
    for counter in range(len(COUNTS)):
        for offset, length, _, _, _, _ in only_counter(shard.table, counter).rows():
            span = slice(offset, offset + length)
            for name in ("param", "exp_avg", "exp_avg_sq"):
                assert_bitwise(mixed[name][span], per_count[counter][name][span], f"counter {counter} {name}")
    assert_padding_untouched(mixed, start, shard)
    assert not torch.equal(mixed["param"], start["param"])
