"""The one-pass (speculative) step against the two-pass step, bit for bit.

Shared helpers: tests/kernels/helpers.py."""

from __future__ import annotations

import pytest
import torch
from dsforget.kernels import DENSE, ThresholdHint, topk_adamw_step
from dsforget.kernels import speculative as speculative_op
from dsforget.kernels import step as step_op
from helpers import (
    BETA1,
    BETA2,
    LARGE_LAYOUT,
    assert_bitwise,
    assert_close,
    assert_padding_untouched,
    build_shard,
    clone,
    random_state,
    run_ranks,
    split_into_shards,
)


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
