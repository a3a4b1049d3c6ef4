"""The multi-tensor step (ForgetAdamW(multi_tensor=True), the default): one call of the fused ops
over all of a param group's tensors, against the per-tensor step it replaces."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from dsforget.kernels import available_backends
from dsforget.kernels import step as step_op
from dsforget.kernels._triton import triton
from torch import nn

import dsforget
from dsforget import ForgetAdamW, MaskPlan, MoFOAdamW, ParamRule

pytestmark = pytest.mark.skipif(
    "cpu" not in available_backends("cpu"),
    reason="no C++ compiler: the multi-tensor step is the cpu backend's",
)

# the fused ops topk_adamw_step calls: what "one call per op" counts
OPS = (
    "update_moments",
    "masked_adamw",
    "abs_histogram",
    "deferred_histogram",
    "apply_deferred",
    "speculative_update",
    "resolve_window",
    "correct_speculation",
)


def make_model(seed: int = 0, layers: int = 3) -> nn.Module:
    """Odd widths; 200 x 150 = 30000 entries: tensors of more than one 16384-element tile."""
    torch.manual_seed(seed)
    blocks: list[nn.Module] = [nn.Linear(200, 150), nn.LayerNorm(150)]
    for _ in range(layers - 1):
        blocks += [nn.Linear(150, 150), nn.ReLU()]
    blocks.append(nn.Linear(150, 7, bias=False))
    return nn.Sequential(*blocks)


def run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    seed: int = 1,
    drop: Callable[[int, str], bool] | None = None,
) -> None:
    """`steps` steps on fresh inputs; drop(step, name): that parameter has no gradient this step."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(32, 200, generator=generator)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        if drop is not None:
            for name, param in model.named_parameters():
                if drop(step, name):
                    param.grad = None
        optimizer.step()


def assert_bit_identical(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        differ = (pa.view(torch.int32) != pb.view(torch.int32)).nonzero()
        assert differ.numel() == 0, (
            f"{name}: {differ.shape[0]} of {pa.numel()} entries differ, first at {differ[0].tolist()}: "
            f"{pa[tuple(differ[0])].item()!r} vs {pb[tuple(differ[0])].item()!r}"
        )


def both_ways(make_optimizer: Callable[..., torch.optim.Optimizer], model: nn.Module, steps: int, **run_args):
    """(multi-tensor model, optimizer), (per-tensor model, optimizer) after the same run."""
    results = []
    for multi_tensor in (True, False):
        copy_ = copy.deepcopy(model)
        optimizer = make_optimizer(copy_, multi_tensor)
        run(copy_, optimizer, steps, **run_args)
        results.append((copy_, optimizer))
    return results


def mofo(**options) -> Callable[[nn.Module, bool], torch.optim.Optimizer]:
    """make(model, multi_tensor) for `both_ways`: MoFOAdamW at lr 1e-2, fraction 0.1, weight decay
    0.1, with `options` (backend, decay scope, ...)."""
    return lambda model, multi_tensor: MoFOAdamW(
        model.named_parameters(),
        lr=1e-2,
        fraction=0.1,
        weight_decay=0.1,
        multi_tensor=multi_tensor,
        **options,
    )


def drop_some(step: int, name: str) -> bool:
    """Gradients missing now and then: a layer every third step, a bias every other step."""
    return (name == "2.weight" and step % 3 == 1) or (name == "0.bias" and step % 2 == 0)


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize(("decay_scope", "topk"), [("all", "exact"), ("selected", "exact"), ("all", "shard")])
@pytest.mark.parametrize("drop", [None, drop_some], ids=["all-grads", "some-grads-missing"])
def test_mofo_multi_tensor_equals_per_tensor_bit_for_bit(decay_scope, topk, one_pass, drop) -> None:
    """Catches a segment addressed in the wrong tensor (an off-by-one start, a block's listed
    entries written into another parameter), a step counter mixed up between parameters (the ones
    whose gradients were missing have fewer moment updates), and table caching across steps
    whose set of tensors with gradients changes."""

    make = mofo(decay_scope=decay_scope, topk=topk, backend="cpu", one_pass=one_pass)
    (multi, multi_opt), (single, _) = both_ways(make, make_model(), steps=14, drop=drop)
    assert multi_opt._batches, "the multi-tensor step never ran"
    assert_bit_identical(multi, single)


@pytest.mark.skipif(triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("backend", [pytest.param("triton", id="triton-interpret")])
def test_triton_multi_tensor_equals_per_tensor_bit_for_bit(backend) -> None:
    """The Triton kernels' TensorLists (run under the interpreter by tests/kernels/test_triton.py,
    deselected elsewhere by tests/conftest.py):
    catches a tile addressed in another tensor (each tensor's address and first shard element),
    a deferred entry written into the wrong parameter (the apply kernel's search of the starts),
    and per-parameter step counts mixed up, with gradients missing now and then."""

    (multi, multi_opt), (single, _) = both_ways(
        mofo(backend=backend), make_model(layers=2), steps=5, drop=drop_some
    )
    assert multi_opt._batches, "the multi-tensor step never ran"
    assert_bit_identical(multi, single)


def test_hft_and_held_parameters_multi_tensor_equals_per_tensor() -> None:
    """HFT freezes half the matrices (dropped from the groups) and resampling holds some of the
    rest (in the table, but with no segment): catches a held parameter's moments or step count
    moving, and a frozen one being stepped."""
    model = make_model(layers=4)
    names = [name for name, _ in model.named_parameters()]
    membership = MaskPlan({name: ParamRule("topk", fraction=0.2) for name in names}, method="mofo")
    held = MaskPlan(
        {
            name: ParamRule("frozen") if name in ("2.weight", "4.bias") else ParamRule("topk", fraction=0.2)
            for name in names
        },
        method="mofo",
    )
    hft = dsforget.plan_for(model, "mofo", fraction=0.2)
    hft = MaskPlan(
        {**hft.rules, "0.weight": ParamRule("frozen"), "6.weight": ParamRule("frozen")}, method="hft"
    )

    results = []
    for multi_tensor in (True, False):
        for plan, active in ((membership, held), (hft, None)):
            copy_ = copy.deepcopy(model)
            optimizer = ForgetAdamW(
                copy_.named_parameters(),
                plan=plan,
                lr=1e-2,
                weight_decay=0.1,
                backend="cpu",
                multi_tensor=multi_tensor,
            )
            run(copy_, optimizer, steps=4)
            if active is not None:
                optimizer.set_active_plan(active)
                run(copy_, optimizer, steps=4, seed=2)
                optimizer.set_active_plan(plan)
            run(copy_, optimizer, steps=4, seed=3)
            results.append(copy_)
    assert_bit_identical(results[0], results[2])
    assert_bit_identical(results[1], results[3])


def test_rowscaled_and_frozen_rows_multi_tensor_equals_per_tensor() -> None:
    """CoFiTune's rules in one table of several tensors: row scales of two parameters (each
    found at its own offset in the concatenated scales) and frozen rows (pieces of a tensor)."""
    model = make_model()
    plan = MaskPlan(
        {
            "0.weight": ParamRule(
                "topk", fraction=0.1, row_scale=tuple(float(i % 7) / 7 for i in range(150))
            ),
            "0.bias": ParamRule("dense"),
            "1.weight": ParamRule("dense"),
            "1.bias": ParamRule("dense"),
            "2.weight": ParamRule("topk", fraction=0.1, frozen_rows=((10, 40), (100, 120))),
            "2.bias": ParamRule("dense", row_scale=tuple(0.5 for _ in range(150))),
            "4.weight": ParamRule("topk", fraction=0.2),
            "4.bias": ParamRule("dense"),
            "6.weight": ParamRule("topk", fraction=0.3, row_scale=tuple(1.0 - i / 10 for i in range(7))),
        },
        method="cofitune",
    )

    def make(model: nn.Module, multi_tensor: bool) -> torch.optim.Optimizer:
        return ForgetAdamW(
            model.named_parameters(),
            plan=plan,
            lr=1e-2,
            weight_decay=0.05,
            backend="cpu",
            multi_tensor=multi_tensor,
        )

    (multi, multi_opt), (single, _) = both_ways(make, model, steps=10)
    assert multi_opt._batches
    assert_bit_identical(multi, single)


def test_fraction_one_multi_tensor_equals_torch_adamw() -> None:
    """fraction 1 over a multi-tensor step must be torch.optim.AdamW (per-group hyperparameters)."""
    model = make_model()
    reference = copy.deepcopy(model)
    plan = MaskPlan({name: ParamRule("topk", fraction=1.0) for name, _ in model.named_parameters()})
    named = list(model.named_parameters())
    ours = ForgetAdamW(
        [{"params": named[:3], "lr": 3e-3, "weight_decay": 0.2}, {"params": named[3:]}],
        plan=plan,
        lr=1e-2,
        betas=(0.8, 0.95),
        eps=1e-6,
        weight_decay=0.05,
        backend="cpu",
    )
    params = list(reference.parameters())
    theirs = torch.optim.AdamW(
        [{"params": params[:3], "lr": 3e-3, "weight_decay": 0.2}, {"params": params[3:]}],
        lr=1e-2,
        betas=(0.8, 0.95),
        eps=1e-6,
        weight_decay=0.05,
    )
    run(model, ours, steps=8)
    run(reference, theirs, steps=8)
    assert len(ours._batches) == 2  # one multi-tensor step per group
    # atol 1e-6: the CPU kernels multiply by 1/sqrt(bc2) where torch divides by sqrt(bc2) (an ulp
    # of the denominator), which 8 steps at lr 1e-2 carry to up to 3e-7 here, on the per-tensor
    # path alike (which the multi-tensor path equals bit for bit, above)
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("saver", "loader"), [(True, True), (True, False), (False, True)])
def test_state_dict_round_trip_and_resume_across_paths(saver: bool, loader: bool) -> None:
    """save -> load into a fresh optimizer -> more steps equals an uninterrupted run, whichever
    path saved and which loads: the checkpoint format (one state per parameter) is unchanged."""

    make = mofo(backend="cpu")
    straight = make_model()
    opt = make(straight, saver)
    run(straight, opt, steps=6, drop=drop_some)
    resumed = copy.deepcopy(straight)
    saved = copy.deepcopy(opt.state_dict())
    assert all(set(state) >= {"exp_avg", "exp_avg_sq", "step"} for state in saved["state"].values())
    run(straight, opt, steps=5, seed=9)
    fresh = make(resumed, loader)
    fresh.load_state_dict(saved)
    run(resumed, fresh, steps=5, seed=9)
    assert_bit_identical(straight, resumed)


def count_op_calls(monkeypatch, layers: int, multi_tensor: bool, steps: int = 8) -> list[int]:
    """Calls of the fused ops in each step of a MoFO run over a model of `layers` layers."""
    calls = [0]
    for name in OPS:
        original = getattr(step_op, name)

        def spy(*args, _original=original, **kwargs):
            calls[0] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(step_op, name, spy)
    model = make_model(layers=layers)
    optimizer = MoFOAdamW(
        model.named_parameters(), lr=1e-2, fraction=0.1, backend="cpu", multi_tensor=multi_tensor
    )
    per_step = []
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 200, generator=generator)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        calls[0] = 0
        optimizer.step()
        per_step.append(calls[0])
    monkeypatch.undo()
    return per_step


def test_kernel_calls_per_step_do_not_scale_with_the_tensors(monkeypatch) -> None:
    """Catches the drop-in path falling back to one call per tensor: 3 or 12 layers (8 or 26
    tensors) take the same handful of op calls per step, where the per-tensor path takes at
    least one per tensor."""
    few = count_op_calls(monkeypatch, layers=3, multi_tensor=True)
    many = count_op_calls(monkeypatch, layers=12, multi_tensor=True)
    per_tensor = count_op_calls(monkeypatch, layers=12, multi_tensor=False)
    tensors = len(list(make_model(layers=12).parameters()))
    # whatever the tensors: at most 10 calls (the one-pass step with every fallback: the update,
    # histogram passes for levels 0, 1 and 2 where windows missed or lists overflowed, the window's
    # level-2 counts, the untouched spans' update, the window's resolution and the corrections)
    assert max(few + many) <= 10, (few, many)
    assert min(per_tensor) >= tensors, per_tensor


def test_changing_sets_of_gradients_keep_one_cached_step_per_group() -> None:
    """Every step a different subset of the parameters has gradients (as with experts a router
    did not pick): catches a cache keyed by the subset, which kept a segment table and its list
    buffers (~0.75 B per element) for every subset ever seen; the results still equal the
    per-tensor step bit for bit."""
    names = [name for name, _ in make_model().named_parameters()]

    def drop_rotating(step: int, name: str) -> bool:
        return names.index(name) % 4 == step % 4

    def make(model: nn.Module, multi_tensor: bool) -> torch.optim.Optimizer:
        return MoFOAdamW(
            model.named_parameters(), lr=1e-3, fraction=0.2, backend="cpu", multi_tensor=multi_tensor
        )

    (multi, multi_opt), (single, _) = both_ways(make, make_model(), steps=12, drop=drop_rotating)
    assert len(multi_opt._batches) == 1, len(multi_opt._batches)  # one group, fp32 gradients
    assert_bit_identical(multi, single)
