"""Blocks whose threshold is exactly 0 (fewer nonzero |m| than k): counted once in the moments
pass, resolved at 0 without a histogram level, a deferral or a correction, with the results of
the full radix select bit for bit.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import math

import pytest
import torch
from dsforget.kernels import DENSE, ThresholdHint, available_backends, update_moments
from dsforget.kernels import step as step_op
from dsforget.kernels.hints import MAX_REACH
from dsforget.kernels.masked_update import AdamWScalars
from dsforget.kernels.moments import HINT_SHIFT, HINT_WINDOW, HintedCounts
from dsforget.kernels.radix import RESOLVED, abs_bits
from helpers import (
    BETA1,
    BETA2,
    LAYOUTS,
    assert_bitwise,
    assert_close,
    assert_padding_untouched,
    build_shard,
    clone,
    fused_backends,
    masked_adamw_on,
    random_state,
    run_ranks,
    select_thresholds,
    split_into_shards,
)

BACKENDS = [pytest.param("torch", "cpu", id="torch")] + [
    pytest.param(c.values[0], c.values[1], id=c.id) for c in fused_backends()
]


def step_cases(variants: dict[str, tuple]) -> list:
    """(backend, device, *variant) for every backend and variant (id: backend-variant), the
    one-pass variants (whose first value is True: speculate) on the cpu backend only, the one
    backend that has the one-pass step."""
    return [
        pytest.param(*backend.values, *values, id=f"{backend.id}-{name}")
        for backend in BACKENDS
        for name, values in variants.items()
        if backend.values[0] == "cpu" or not values[0]
    ]


def own_nonzero(exp_avg: torch.Tensor, table) -> torch.Tensor:
    """Each block's entries with |m| != 0, recounted from m."""
    counts = torch.zeros(table.num_blocks, dtype=torch.int64)
    for shard_offset, length, _, _, block, _ in table.rows():
        if block != DENSE:
            counts[block] += int((abs_bits(exp_avg[shard_offset : shard_offset + length].cpu()) != 0).sum())
    return counts


@pytest.mark.parametrize("counts", ["histogram", "hinted", "nonzero-only"])
@pytest.mark.parametrize(("backend", "device", "size"), fused_backends(include_large=True))
def test_update_moments_counts_nonzero_entries(backend, device, size, counts):
    """Catches nonzero counts lost or doubled where tiles, threads or segments of one block meet,
    DENSE segments counted, -0.0 taken for nonzero, or counts that depend on which other counts
    the pass makes (level-0 histogram, hint windows, none)."""
    shard = build_shard(LAYOUTS[size], device, seed=3)
    before = random_state(shard, seed=4)
    # every other run of 1000 entries exactly 0 (m and g), a few -0.0 among them
    zero = (torch.arange(shard.numel, device=device) // 1000) % 2 == 0
    before["exp_avg"][zero & shard.covered] = 0.0
    before["grad"][zero & shard.covered] = 0.0
    before["exp_avg"][zero & shard.covered & (torch.arange(shard.numel, device=device) % 7 == 0)] = -0.0
    states = {name: clone(before) for name in ("torch", backend)}
    found = {}
    n_blocks = shard.table.num_blocks
    for name, state in states.items():
        nonzero = torch.zeros(n_blocks, dtype=torch.int64, device=device)
        options = {}
        if counts == "histogram":
            options["histogram"] = torch.zeros(n_blocks, 2048, dtype=torch.int64, device=device)
        elif counts == "hinted":
            start = torch.tensor([700, -1, 0, 0][:n_blocks], device=device)
            start = torch.cat([start, torch.zeros(max(0, n_blocks - 4), dtype=torch.int64, device=device)])
            options["hinted"] = HintedCounts(
                start,
                torch.full_like(start, 600),
                torch.zeros_like(start),
                torch.zeros(n_blocks, HINT_WINDOW, dtype=torch.int64, device=device),
            )
        update_moments(
            state["grad"],
            state["exp_avg"],
            state["exp_avg_sq"],
            shard.table,
            beta1=BETA1,
            beta2=BETA2,
            nonzero=nonzero,
            backend=name,
            **options,
        )
        found[name] = nonzero
    expected = own_nonzero(states[backend]["exp_avg"], shard.table)
    assert 0 < int(expected.sum()) < sum(r[1] for r in shard.table.rows() if r[4] != DENSE)
    assert_bitwise(found[backend], expected, "nonzero counts of the backend's own m")
    assert_bitwise(found["torch"], own_nonzero(states["torch"]["exp_avg"], shard.table), "reference counts")
    assert_padding_untouched(states[backend], before, shard)


# (entries, nonzero entries) of the top-k blocks; k = floor(0.15 n)
ZERO_BLOCKS = {
    1: (2000, 200),  # 90% exact zeros: 200 < k = 300
    2: (1500, 0),  # 100% exact zeros
    3: (1000, 150),  # exactly k nonzero: a threshold above 0, zeros below it
    4: (1000, 149),  # k - 1: the k-th largest is a zero
    5: (1000, 151),  # k + 1
}
AT_ZERO = [1, 2, 4]


def zero_layout(generator: torch.Generator, normal: bool = True):
    """Parameters (values, row_len, block) with the blocks of ZERO_BLOCKS, a normal block 0 (if
    `normal`, else a block of 90% zeros) and a DENSE one; and each block's mask of nonzero entries."""
    params, nonzero_masks = [], {}
    if normal:
        params.append((torch.randn(3001, generator=generator) * 0.1, 7, 0))
        nonzero_masks[0] = torch.ones(3001, dtype=torch.bool)
    else:
        values = torch.zeros(3001)
        values[torch.randperm(3001, generator=generator)[:300]] = 0.1
        params.append((values, 7, 0))
        nonzero_masks[0] = values != 0
    params.append((torch.randn(64, generator=generator), 1, DENSE))
    for block, (size, nonzero) in ZERO_BLOCKS.items():
        mask = torch.zeros(size, dtype=torch.bool)
        mask[torch.randperm(size, generator=generator)[:nonzero]] = True
        values = torch.randn(size, generator=generator) * 0.1 * mask
        params.append((values, 10, block))
        nonzero_masks[block] = mask
    return params, nonzero_masks


def place(states, pieces, params, name: str, generator=None, masks=None):
    """Write each parameter's values into the ranks' `name` tensors (times a fresh random factor
    near 1 on the nonzero entries, if a generator is given)."""
    for index, (values, _, block) in enumerate(params):
        for rank, offset, param_offset, length in pieces[index]:
            piece = values[param_offset : param_offset + length]
            if generator is not None:
                piece = piece + torch.randn(length, generator=generator) * 0.01
                if block != DENSE:
                    piece = piece * masks[block][param_offset : param_offset + length]
            states[rank][name][offset : offset + length] = piece.to(states[rank][name].device)


def spy_on_counting(monkeypatch, seen: dict[str, list]) -> None:
    """Records the prefixes of every histogram pass over m and over deferred entries, and the
    summed nonzero counts the step resolves blocks at 0 from."""
    passes, deferred, resolve = step_op.abs_histogram, step_op.deferred_histogram, step_op.resolve_at_zero

    def spied_pass(exp_avg, table, prefix, level, histogram, backend):
        seen["passes"].append((level, prefix.cpu().clone()))
        passes(exp_avg, table, prefix, level, histogram, backend=backend)

    def spied_deferred(entries, prefix, level, histogram, backend):
        seen["deferred"].append((level, prefix.cpu().clone()))
        deferred(entries, prefix, level, histogram, backend=backend)

    def spied_resolve(state, nonzero):
        seen["nonzero"].append(nonzero.cpu().clone())
        return resolve(state, nonzero)

    monkeypatch.setattr(step_op, "abs_histogram", spied_pass)
    monkeypatch.setattr(step_op, "deferred_histogram", spied_deferred)
    monkeypatch.setattr(step_op, "resolve_at_zero", spied_resolve)


def previous_rule(state, nonzero):
    """The step before the rule: no block is resolved at 0 from its nonzero count."""
    return torch.zeros_like(state.unresolved)


@pytest.mark.parametrize(
    ("backend", "device", "speculate", "scope"),
    step_cases(
        {
            "one-pass": (True, "all"),
            "two-pass": (False, "all"),
            "two-pass-decay-selected": (False, "selected"),
        }
    ),
)
def test_blocks_at_zero_equal_the_full_select_and_count_nothing_more(
    backend, device, speculate, scope, monkeypatch
):
    """Catches a block of k - 1 nonzero |m| (or 90%, 100% zeros) not resolved at 0, one of k or
    k + 1 resolved at 0 (its threshold is above 0), nonzero counts not summed over ranks (the
    90% block straddles the two ranks' shards), any bit of the step that differs from the previous
    rule (the full radix select over the zeros) or from the reference pipeline, and a block at 0
    that is still counted by a histogram pass, deferred, listed or corrected by the one-pass
    step, or that misses its window after its first step (its hint: an empty window at 0).
    Weight decay on selected entries only makes the selection of the zeros visible in p (their
    AdamW step is 0)."""
    generator = torch.Generator().manual_seed(17)
    params, masks = zero_layout(generator)
    shards, pieces = split_into_shards(params, cut=4200, device=device)
    runs = {rule: [random_state(shard, seed=40 + rank) for rank, shard in enumerate(shards)] for rule in "np"}
    for states in runs.values():
        place(states, pieces, params, "exp_avg")
    expected = [clone(state) for state in runs["n"]]
    hyper = dict(lr=1e-2, betas=(BETA1, BETA2), eps=1e-8, weight_decay=0.1)
    hyper["decay_selected_only"] = scope == "selected"
    seen: dict[str, dict[str, list]] = {rule: {"passes": [], "deferred": [], "nonzero": []} for rule in "np"}
    spied_left: list = []
    speculative_update = step_op.speculative_update

    def spied_update(*args, **kwargs):
        spied_left.append(speculative_update(*args, **kwargs))
        return spied_left[-1]

    hints = {rule: [None, None] for rule in "np"}
    for step in range(1, 5):
        fresh = [clone(state) for state in runs["n"]]
        place(fresh, pieces, params, "grad", generator, masks)
        for states in (*runs.values(), expected):
            for rank, state in enumerate(states):
                state["grad"][shards[rank].covered] = fresh[rank]["grad"][shards[rank].covered]
        for rule, states in runs.items():
            with monkeypatch.context() as patch:
                spy_on_counting(patch, seen[rule])
                if rule == "p":
                    patch.setattr(step_op, "resolve_at_zero", previous_rule)
                else:
                    patch.setattr(step_op, "speculative_update", spied_update)

                def step_on_rank(rank, sum_over_ranks, states=states, step=step, rule=rule):
                    state = states[rank]
                    return topk_adamw_step_of(state, shards[rank].table, step, hints[rule][rank])(
                        sum_over_ranks, backend, speculate, hyper
                    )

                hints[rule] = run_ranks(step_on_rank, 2)
        radix = select_thresholds(shards, expected, "torch")
        for shard, state in zip(shards, expected, strict=True):
            masked_adamw_on(state, shard.table, radix.threshold, AdamWScalars.at_step(step, **hyper), "torch")
        threshold_prefix = radix.threshold >> HINT_SHIFT
        for rank in range(2):
            for name in ("exp_avg", "exp_avg_sq", "param"):
                what = f"step {step} rank {rank} {name}"
                previous = runs["p"][rank][name]
                assert_bitwise(runs["n"][rank][name], previous, f"{what} against the previous rule")
                assert_close(runs["n"][rank][name], expected[rank][name], f"{what} against the reference")
            assert_padding_untouched(runs["n"][rank], expected[rank], shards[rank])
            hint = hints["n"][rank]
            assert_bitwise(hint.prefix, threshold_prefix, f"step {step} rank {rank} thresholds")
            assert_bitwise(hints["p"][rank].prefix, threshold_prefix, f"step {step} previous rule thresholds")
            assert hint.prefix[AT_ZERO].eq(0).all() and hint.prefix[[0, 3, 5]].gt(0).all(), hint.prefix
            assert hint.start[AT_ZERO].eq(0).all() and hint.width[AT_ZERO].eq(0).all(), "empty windows at 0"
        exact = sum(own_nonzero(runs["n"][rank]["exp_avg"], shards[rank].table) for rank in range(2))
        assert_bitwise(seen["n"]["nonzero"][-1], exact, f"step {step} nonzero counts summed over ranks")
        assert exact.tolist()[1:] == [nonzero for _, nonzero in ZERO_BLOCKS.values()]

    for level, prefix in seen["n"]["passes"] + seen["n"]["deferred"]:
        assert prefix[AT_ZERO].eq(RESOLVED).all(), f"a block at 0 counted at level {level}: {prefix}"
    assert any(prefix[AT_ZERO].ne(RESOLVED).any() for _, prefix in seen["p"]["passes"]), (
        "the previous rule counts the zeros over m (else this test proves nothing)"
    )
    if speculate:
        assert len(spied_left) == 6, "steps 2-4 of both ranks speculate"
        for left in spied_left:
            assert not torch.isin(left.deferred.block, torch.tensor(AT_ZERO)).any(), "a block at 0 listed"


def topk_adamw_step_of(state, table, step, hint):
    def run(sum_over_ranks, backend, speculate, hyper):
        return step_op.topk_adamw_step(
            state["param"],
            state["grad"],
            state["exp_avg"],
            state["exp_avg_sq"],
            table,
            step=step,
            hint=hint,
            sum_over_ranks=sum_over_ranks,
            backend=backend,
            speculate=speculate,
            **hyper,
        )

    return run


@pytest.mark.parametrize(
    ("backend", "device", "speculate"), step_cases({"one-pass": (True,), "two-pass": (False,)})
)
def test_a_shard_of_blocks_at_zero_takes_no_pass_after_the_moments(backend, device, speculate, monkeypatch):
    """Catches any work past the moments pass for blocks whose threshold is 0: with every top-k
    block at 0 (90% and 100% zeros, k - 1 nonzero) no histogram pass over m runs in any step,
    nothing is deferred, and from the second step (hints: empty windows at 0) the one-pass step
    lists no window entries, leaves nothing untouched and corrects nothing."""
    generator = torch.Generator().manual_seed(23)
    params, masks = zero_layout(generator, normal=False)
    renumbered = {0: 0, DENSE: DENSE, 1: 1, 2: 2, 4: 3}  # only blocks whose threshold is 0
    params = [
        (values, row_len, renumbered[block]) for values, row_len, block in params if block in renumbered
    ]
    masks = {renumbered[block]: mask for block, mask in masks.items() if block in renumbered}
    shards, pieces = split_into_shards(params, cut=3500, device=device)
    states = [random_state(shard, seed=60 + rank) for rank, shard in enumerate(shards)]
    place(states, pieces, params, "exp_avg")
    seen: dict[str, list] = {"passes": [], "deferred": [], "nonzero": [], "left": [], "corrected": []}
    spy_on_counting(monkeypatch, seen)
    speculative_update, correct = step_op.speculative_update, step_op.correct_speculation

    def spied_update(*args, **kwargs):
        seen["left"].append(speculative_update(*args, **kwargs))
        return seen["left"][-1]

    def spied_correct(*args, **kwargs):
        seen["corrected"].append(True)
        correct(*args, **kwargs)

    monkeypatch.setattr(step_op, "speculative_update", spied_update)
    monkeypatch.setattr(step_op, "correct_speculation", spied_correct)
    masked = step_op.masked_adamw

    def spied_masked(*args, **kwargs):
        seen.setdefault("capacity", []).append(kwargs.get("defer_capacity", 0))
        return masked(*args, **kwargs)

    monkeypatch.setattr(step_op, "masked_adamw", spied_masked)
    hyper = dict(lr=1e-2, betas=(BETA1, BETA2), eps=1e-8, weight_decay=0.0, decay_selected_only=False)
    hints = [None, None]
    for step in range(1, 4):
        fresh = [clone(state) for state in states]
        place(fresh, pieces, params, "grad", generator, masks)
        for rank, state in enumerate(states):
            state["grad"][shards[rank].covered] = fresh[rank]["grad"][shards[rank].covered]

        def step_on_rank(rank, sum_over_ranks, step=step, hints=hints):
            return topk_adamw_step_of(states[rank], shards[rank].table, step, hints[rank])(
                sum_over_ranks, backend, speculate, hyper
            )

        hints = run_ranks(step_on_rank, 2)
        for hint in hints:
            assert hint.prefix.eq(0).all() and hint.width.eq(0).all() and hint.start.eq(0).all(), hint
    assert seen["passes"] == [] and seen["deferred"] == [], "a block at 0 counted over m or deferred"
    assert all(capacity == 0 for capacity in seen.get("capacity", [])), "a block at 0 deferred"
    if speculate:
        assert len(seen["left"]) == 4, "steps 2-3 of both ranks speculate"
        for left in seen["left"]:
            # (its rollbacks are listed: had the block left 0, they would restore p)
            assert left.deferred.index.numel() == 0, "an entry of a block at 0 listed as in its window"
            assert left.untouched.numel() == 0, "a piece of a block at 0 left untouched"
        assert seen["corrected"] == [], "a block at 0 corrected"


def test_hints_after_a_threshold_of_zero():
    """Catches a block at 0 given a window that lists its zeros (instead of an empty window at 0),
    a window after 0 extrapolated from the move off 0 (instead of a first window around the new
    threshold), and the C++ hint disagreeing with the reference on these rules."""
    threshold = torch.tensor([0, 0, 5 << 20, 3 << 20, 1000, 7 << 20])
    previous = ThresholdHint.around(
        torch.tensor([0, 900, 0, 3, 0, 7 << 10]),
        torch.tensor([0, 850, 10, 3, 0, 7 << 10]),
        torch.tensor([32, 64, 32, 40, 32, 32]),
    )
    backends = ["torch"] + (["cpu"] if "cpu" in available_backends("cpu") else [])
    for backend in backends:
        first = ThresholdHint.after(threshold, None, backend=backend)
        assert first.width.tolist()[:2] == [0, 0] and first.start.tolist()[:2] == [0, 0]
        assert first.width[2:].gt(0).all()
        hint = ThresholdHint.after(threshold, previous, backend=backend)
        prefix = threshold >> HINT_SHIFT
        assert hint.start.tolist()[:2] == [0, 0] and hint.width.tolist()[:2] == [0, 0], hint
        # after a threshold in prefix 0: a first window around the new one
        for b in (2, 4):
            assert int(hint.center[b]) == int(prefix[b]) and int(hint.reach[b]) == MAX_REACH, (b, hint)
        # otherwise the usual extrapolation (block 5 did not move: center = prefix)
        assert int(hint.center[5]) == int(prefix[5]) and int(hint.width[5]) > 0
        assert math.isclose(int(hint.reach[3]), min(MAX_REACH, 3 * abs(int(prefix[3]) - 3) + 32))
        reference = ThresholdHint.after(threshold, previous, backend="torch")
        for name in ("prefix", "center", "reach", "start", "width"):
            assert_bitwise(getattr(hint, name), getattr(reference, name), f"{backend} {name}")
