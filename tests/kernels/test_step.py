"""The whole step: `topk_adamw_step` and the three-op pipeline against per-block torch.topk,
torch.optim.AdamW, and themselves on other shard layouts.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import math

import pytest
import torch
from dsforget.kernels import (
    DENSE,
    NO_ROWSCALE,
    SegmentTable,
    ThresholdHint,
    level_bins,
    masked_adamw,
    topk_adamw_step,
    update_moments,
)
from dsforget.kernels import step as step_op
from dsforget.kernels.masked_update import AdamWScalars
from dsforget.kernels.moments import HINT_SHIFT
from dsforget.kernels.radix import abs_bits
from helpers import (
    BETA1,
    BETA2,
    UPDATE,
    Shard,
    assert_bitwise,
    assert_close,
    assert_padding_untouched,
    clone,
    fused_backends,
    masked_adamw_on,
    random_state,
    run_ranks,
    select_thresholds,
    split_into_shards,
    triton_backends,
)
from torch.overrides import TorchFunctionMode


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
            masked_adamw_on(state, shard.table, radix.threshold, AdamWScalars.at_step(step, **hyper), "torch")
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
        masked_adamw_on(
            state,
            shard.table,
            radix.threshold,
            AdamWScalars(**UPDATE, weight_decay=0.0, decay_selected_only=False),
            backend,
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
    masked_adamw_on(
        state,
        table,
        radix.threshold,
        AdamWScalars(**UPDATE, weight_decay=0.1, decay_selected_only=False),
        backend,
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


# Tensor methods and functions that make the host wait for the device (a read of a value, or an
# output whose size depends on values)
HOST_READS = {
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "item",
    "tolist",
    "cpu",
    "numpy",
    "nonzero",
    "unique",
    "masked_select",
    "repeat_interleave",
}


class _HostReads(TorchFunctionMode):
    """Records the name of every torch call in HOST_READS made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in HOST_READS:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("backend", "device"), triton_backends())
def test_a_step_whose_windows_hit_reads_the_host_once(backend, device, monkeypatch):
    """Catches a host sync added to the hinted Triton step (a bool of a mask, an int of a count,
    a list length read back): a step whose windows all hit, deferring entries, reads the host
    once, `_open_bins`'s three numbers, so a GPU keeps its queue full across the step's ~20 launches."""
    deferred_lists: list[int] = []
    apply = step_op.apply_deferred

    def spied_apply(param, deferred, thresholds, update, backend):
        deferred_lists.append(deferred.index.numel())
        apply(param, deferred, thresholds, update, backend=backend)

    monkeypatch.setattr(step_op, "apply_deferred", spied_apply)
    generator = torch.Generator().manual_seed(5)
    rows = [
        (0, 3000, 0, 30, 0, NO_ROWSCALE),
        (3000, 64, 0, 1, DENSE, NO_ROWSCALE),
        (3064, 2000, 0, 20, 1, NO_ROWSCALE),
    ]
    table = SegmentTable.build(rows, None, [450, 300], device=device)
    m = torch.randn(5064, generator=generator) * 0.1
    # block 0's |m| all in one level-1 bin (1024 bit patterns from 0.05 on): its threshold's bin
    # is deferred every step
    bits = (abs_bits(torch.tensor([0.05])) & ~1023) + torch.randint(0, 1024, (3000,), generator=generator)
    m[:3000] = bits.to(torch.int32).view(torch.float32) * torch.where(
        torch.rand(3000, generator=generator) < 0.5, -1.0, 1.0
    )
    state = {
        "param": torch.randn(5064, generator=generator).to(device),
        "exp_avg": m.to(device),
        "exp_avg_sq": (m * m).to(device),
    }
    hint, reads = None, []
    for step in range(1, 7):
        # g = m: m, and so each block's threshold, stays where it is (every window hits)
        grad = state["exp_avg"].clone()
        with _HostReads() as host_reads:
            hint = topk_adamw_step(
                state["param"],
                grad,
                state["exp_avg"],
                state["exp_avg_sq"],
                table,
                step=step,
                lr=1e-2,
                betas=(BETA1, BETA2),
                eps=1e-8,
                weight_decay=0.1,
                decay_selected_only=False,
                hint=hint,
                backend=backend,
            )
        reads.append(host_reads.names)
    assert deferred_lists and min(deferred_lists) > 0, "no step deferred entries: the test checks no list"
    assert reads[2:] == [["tolist"]] * 4, reads
