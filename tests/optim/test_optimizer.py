"""ForgetAdamW / MoFOAdamW on plain (unsharded) parameters against readable references."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from dsforget.kernels import available_backends
from torch import nn

import dsforget
from dsforget import ForgetAdamW, MaskPlan, MoFOAdamW, ParamRule, PlanError
from dsforget.optim.optimizer import INITIAL

# Every backend that runs on CPU tensors here: the references and, with a compiler, the C++ path.
BACKENDS = [b for b in available_backends("cpu") if b != "triton"]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(13, 9), nn.LayerNorm(9), nn.ReLU(), nn.Linear(9, 5), nn.Linear(5, 1, bias=False)
    )


def run(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 13, generator=generator)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def assert_close_params(a: nn.Module, b: nn.Module, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "rule", [ParamRule("dense"), ParamRule("topk", fraction=1.0)], ids=["dense", "topk1"]
)
def test_fraction_one_equals_torch_adamw(rule: ParamRule, backend: str) -> None:
    """fraction 1 (or dense) with no masks must be torch.optim.AdamW: catches wrong bias
    correction, eps placement, decay order, and per-group hyperparameters being ignored."""
    model = make_model()
    reference = copy.deepcopy(model)
    plan = MaskPlan({name: rule for name, _ in model.named_parameters()})
    head, tail = list(model.named_parameters())[:2], list(model.named_parameters())[2:]
    groups = [{"params": head, "lr": 3e-3, "weight_decay": 0.2}, {"params": tail}]
    ours = ForgetAdamW(
        groups, plan=plan, lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, backend=backend
    )
    ref_params = list(reference.parameters())
    theirs = torch.optim.AdamW(
        [{"params": ref_params[:2], "lr": 3e-3, "weight_decay": 0.2}, {"params": ref_params[2:]}],
        lr=1e-2,
        betas=(0.8, 0.95),
        eps=1e-6,
        weight_decay=0.05,
    )
    run(model, ours, steps=60)
    run(reference, theirs, steps=60)
    assert_close_params(model, reference)


def mofo_reference(
    params: dict[str, torch.Tensor],
    grads_per_step: list[dict[str, torch.Tensor]],
    dense: set[str],
    fraction: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decay_scope: str,
) -> dict[str, torch.Tensor]:
    """MoFO as the paper states it, one parameter at a time with torch.topk."""
    params = {k: v.clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v = {k: torch.zeros_like(x) for k, x in params.items()}
    for t, grads in enumerate(grads_per_step, start=1):
        for name, p in params.items():
            g = grads[name]
            m[name].lerp_(g, 1 - betas[0])  # = b1*m + (1-b1)*g, computed as torch.optim.AdamW does
            v[name].mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
            m_hat = m[name] / (1 - betas[0] ** t)
            v_hat = v[name] / (1 - betas[1] ** t)
            if name in dense:
                selected = torch.ones_like(p, dtype=torch.bool)
            else:
                k = max(1, math.floor(fraction * p.numel()))
                kth_largest = m[name].abs().flatten().topk(k).values[-1]
                selected = m[name].abs() >= kth_largest
            decay = 1 - lr * weight_decay
            p.mul_(torch.where(selected, decay, 1.0) if decay_scope == "selected" else decay)
            p.sub_(lr * selected * m_hat / (v_hat.sqrt() + eps))
    return params


def random_grads(shapes: dict[str, tuple[int, ...]], steps: int, ties: bool, seed: int = 2) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        grads = {}
        for name, shape in shapes.items():
            g = torch.randn(shape, generator=generator)
            grads[name] = g.round().clamp(-1, 1) * 0.5 if ties else g  # ties: many equal |m|
        out.append(grads)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("decay_scope", ["all", "selected"])
@pytest.mark.parametrize("topk", ["exact", "shard"])
def test_mofo_matches_topk_reference(ties: bool, decay_scope: str, topk: str, backend: str) -> None:
    """Catches a wrong k (floor, k >= 1 for tiny tensors), ties at the threshold dropped,
    decay applied to the wrong entries, and biases/norms not exempted."""
    shapes = {"w": (17, 23), "w.bias": (17,), "tiny": (1,), "pair": (2,), "norm.weight": (23,)}
    torch.manual_seed(0)
    start = {name: torch.randn(shape) for name, shape in shapes.items()}
    tensors = {name: nn.Parameter(value.clone()) for name, value in start.items()}
    fraction, lr, betas, eps, wd = 0.15, 3e-2, (0.9, 0.99), 1e-8, 0.1
    optimizer = MoFOAdamW(
        tensors.items(),
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=wd,
        fraction=fraction,
        topk=topk,
        decay_scope=decay_scope,
        backend=backend,
    )
    grads = random_grads(shapes, steps=6, ties=ties)
    for step_grads in grads:
        for name, p in tensors.items():
            p.grad = step_grads[name].clone()
        optimizer.step()
    expected = mofo_reference(
        start, grads, {"w.bias", "norm.weight"}, fraction, lr, betas, eps, wd, decay_scope
    )
    for name, p in tensors.items():
        torch.testing.assert_close(
            p.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_selected_entries_are_the_floor_fraction_largest(backend: str) -> None:
    """After one step from zero moments only selected entries move: exactly the floor(f*n)
    entries of largest |m| (= largest |g| on the first step), not merely that many entries."""
    weight = nn.Parameter(torch.randn(31, 37))
    before = weight.detach().clone()
    optimizer = MoFOAdamW([("w", weight)], lr=1e-2, fraction=0.2, backend=backend)
    weight.grad = torch.randn(31, 37)
    optimizer.step()
    k = math.floor(0.2 * 31 * 37)
    expected = torch.zeros(31 * 37, dtype=torch.bool)
    expected[weight.grad.abs().flatten().topk(k).indices] = True
    moved = (weight.detach() != before).flatten()
    assert torch.equal(moved, expected), f"{int((moved != expected).sum())} entries differ"


def test_row_scale_scales_gradient_rows() -> None:
    """row_scale multiplies output row r (dim 0) of the gradient: equal to AdamW on scaled grads."""
    torch.manual_seed(3)
    weight = nn.Parameter(torch.randn(6, 4))
    reference = nn.Parameter(weight.detach().clone())
    scale = torch.tensor([1.0, 0.0, 0.5, 0.25, 2.0, 0.9])
    plan = MaskPlan({"w": ParamRule("dense", row_scale=tuple(scale.tolist()))})
    ours = ForgetAdamW([("w", weight)], plan=plan, lr=1e-2, backend="torch")
    theirs = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.0)
    for _ in range(5):
        grad = torch.randn(6, 4)
        weight.grad, reference.grad = grad.clone(), grad * scale[:, None]
        ours.step()
        theirs.step()
    torch.testing.assert_close(weight, reference, rtol=1e-6, atol=1e-7)
    assert torch.equal(weight.detach()[1], reference.detach()[1])


def test_identical_runs_are_bit_identical() -> None:
    """Nothing in the step may depend on uninitialised memory, dict order or time."""
    results = []
    for _ in range(2):
        model = make_model()
        plan = dsforget.plan_for(model, "mofo", fraction=0.3)
        run(model, ForgetAdamW(model.named_parameters(), plan=plan, lr=1e-2, backend="torch"), steps=10)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no C++ compiler: the one-pass step is the cpu backend's")
def test_one_pass_switch_changes_the_work_not_the_result(monkeypatch) -> None:
    """Catches `one_pass` not reaching the kernels (either way) and a result that depends on it."""
    from dsforget.kernels import step as step_op

    calls: list[int] = []
    speculate = step_op.speculative_update

    def counted(*args, **kwargs):
        calls.append(1)
        return speculate(*args, **kwargs)

    monkeypatch.setattr(step_op, "speculative_update", counted)
    results = []
    for one_pass in (True, False):
        calls.clear()
        model = make_model()
        plan = dsforget.plan_for(model, "mofo", fraction=0.3)
        optimizer = ForgetAdamW(
            model.named_parameters(), plan=plan, lr=1e-2, backend="cpu", one_pass=one_pass
        )
        run(model, optimizer, steps=10)
        assert bool(calls) == one_pass, f"one_pass={one_pass}: {len(calls)} one-pass steps"
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_state_dict_round_trip_continues_identically() -> None:
    """save -> load into a fresh optimizer -> 3 more steps equals an uninterrupted run."""
    straight = make_model()
    plan = dsforget.plan_for(straight, "mofo", fraction=0.3)
    opt = ForgetAdamW(straight.named_parameters(), plan=plan, lr=1e-2, weight_decay=0.1, backend="torch")
    run(straight, opt, steps=5, seed=1)
    resumed = copy.deepcopy(straight)
    saved = copy.deepcopy(opt.state_dict())
    run(straight, opt, steps=3, seed=9)
    fresh = ForgetAdamW(resumed.named_parameters(), plan=plan, lr=1e-2, weight_decay=0.1, backend="torch")
    fresh.load_state_dict(saved)
    run(resumed, fresh, steps=3, seed=9)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_while_resampling_keeps_each_parameters_step(backend: str) -> None:
    """save -> load -> steps equals an uninterrupted run when HFT resampling holds parameters:
    catches per-parameter step counts that a checkpoint drops or resets (a resumed run would
    bias-correct the held parameters by the shard's step again once they train)."""
    straight = make_model()
    names = [name for name, _ in straight.named_parameters()]
    membership = MaskPlan({name: ParamRule("topk", fraction=0.5) for name in names})
    held = MaskPlan(
        {
            name: ParamRule("frozen") if name.startswith("3.") else ParamRule("topk", fraction=0.5)
            for name in names
        }
    )
    hyper = dict(plan=membership, lr=1e-2, weight_decay=0.1, backend=backend)
    opt = ForgetAdamW(straight.named_parameters(), **hyper)
    run(straight, opt, steps=2, seed=1)
    opt.set_active_plan(held)
    run(straight, opt, steps=6, seed=2)
    resumed = copy.deepcopy(straight)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"][0]["param_steps"] == [8] and opt.state[straight[3].weight]["param_steps"] == [2]
    for model, optimizer in ((straight, opt), (resumed, ForgetAdamW(resumed.named_parameters(), **hyper))):
        if optimizer is not opt:
            optimizer.load_state_dict(saved)
        optimizer.set_active_plan(membership)
        run(model, optimizer, steps=3, seed=9)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.state[straight[3].weight]["param_steps"] == [5]


class PulledAdamW(torch.optim.AdamW):
    """The hand-written L2-SP reference: torch's AdamW, each step preceded by an explicit decoupled
    pull w <- w - lr * strength * (w - w0) towards the values the parameters had at construction."""

    def __init__(self, params, strength: float, **hyper) -> None:
        super().__init__(params, **hyper)
        self.strength = strength
        self.initial = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        lrs = [g["lr"] for g in self.param_groups for _ in g["params"]]
        for p, w0, lr in zip(params, self.initial, lrs, strict=True):
            p.sub_(lr * self.strength * (p - w0))
        return super().step(closure)


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_matches_adamw_with_an_explicit_pull(backend: str) -> None:
    """l2 must be AdamW plus the decoupled pull towards the initial weights: catches a pull taken
    towards the current (not initial) weights, scaled without lr, coupled into the gradient, or
    applied after the Adam update; per-group learning rates must scale it too."""
    model = make_model()
    reference = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    plan = dsforget.plan_for(model, "l2", strength=5.0)
    head, tail = list(model.named_parameters())[:2], list(model.named_parameters())[2:]
    ours = ForgetAdamW(
        [{"params": head, "lr": 3e-3}, {"params": tail}],
        plan=plan,
        lr=1e-2,
        weight_decay=0.05,
        backend=backend,
    )
    ref_params = list(reference.parameters())
    theirs = PulledAdamW(
        [{"params": ref_params[:2], "lr": 3e-3}, {"params": ref_params[2:]}], 5.0, lr=1e-2, weight_decay=0.05
    )
    run(model, ours, steps=60)
    run(reference, theirs, steps=60)
    assert_close_params(model, reference)
    pulled = make_model()  # without the pull the run ends elsewhere: the test can fail
    run(pulled, ForgetAdamW(pulled.named_parameters(), plan=dsforget.plan_for(pulled, "full"), lr=1e-2), 60)
    assert all(
        (a - w0).norm() < 0.9 * (b - w0).norm()
        for a, b, w0 in zip(model.parameters(), pulled.parameters(), initial, strict=True)
    )


def test_l2_at_strength_zero_is_full_fine_tuning_bit_for_bit() -> None:
    """Strength 0 must cost nothing and change nothing: no copy of w0, the same bits as full."""
    results = []
    for method, options in (("full", {}), ("l2", {"strength": 0.0})):
        model = make_model()
        plan = dsforget.plan_for(model, method, **options)
        optimizer = ForgetAdamW(model.named_parameters(), plan=plan, lr=1e-2, weight_decay=0.1)
        run(model, optimizer, steps=10)
        assert all(INITIAL not in state for state in optimizer.state.values())
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_with_mofo_pulls_every_entry_of_a_filtered_parameter(backend: str) -> None:
    """l2+mofo is MoFO's masked step preceded by the pull on every entry, selected or not (an
    entry MoFO leaves alone still drifts back towards w0)."""
    model = make_model()
    reference = copy.deepcopy(model)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    hyper = dict(lr=1e-2, weight_decay=0.1, backend=backend)
    ours = ForgetAdamW(
        model.named_parameters(),
        plan=dsforget.plan_for(model, "l2+mofo", strength=4.0, fraction=0.3),
        **hyper,
    )
    mofo = ForgetAdamW(
        reference.named_parameters(), plan=dsforget.plan_for(reference, "mofo", fraction=0.3), **hyper
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(12):
        x = torch.randn(8, 13, generator=generator)
        for net, optimizer in ((model, ours), (reference, mofo)):
            optimizer.zero_grad()
            net(x).pow(2).mean().backward()
        with torch.no_grad():
            for name, p in reference.named_parameters():
                p.lerp_(initial[name], 1e-2 * 4.0)
        ours.step()
        mofo.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_l2_resume_pulls_towards_the_pretrained_weights_not_the_resumed_ones() -> None:
    """save -> load into a fresh optimizer (built on the trained weights) -> more steps equals an
    uninterrupted run: w0 must come from the checkpoint, not from the weights at resume."""
    straight = make_model()
    initial = [p.detach().clone() for p in straight.parameters()]
    plan = dsforget.plan_for(straight, "l2", strength=5.0)
    opt = ForgetAdamW(straight.named_parameters(), plan=plan, lr=1e-2, backend="torch")
    run(straight, opt, steps=5, seed=1)
    resumed = copy.deepcopy(straight)
    saved = copy.deepcopy(opt.state_dict())
    run(straight, opt, steps=3, seed=9)
    fresh = ForgetAdamW(resumed.named_parameters(), plan=plan, lr=1e-2, backend="torch")
    fresh.load_state_dict(saved)
    assert all(
        torch.equal(fresh.state[p][INITIAL], w0) for p, w0 in zip(resumed.parameters(), initial, strict=True)
    )
    run(resumed, fresh, steps=3, seed=9)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_dict_from_another_plan_is_refused() -> None:
    model = make_model()
    opt = ForgetAdamW(model.named_parameters(), plan=dsforget.plan_for(model, "mofo", fraction=0.3))
    run(model, opt, steps=1)
    other = ForgetAdamW(model.named_parameters(), plan=dsforget.plan_for(model, "mofo", fraction=0.2))
    with pytest.raises(PlanError, match="saved under plan .* resume with the plan.json"):
        other.load_state_dict(opt.state_dict())


def test_frozen_parameters_get_no_state_and_never_move() -> None:
    model = make_model()
    names = [name for name, _ in model.named_parameters()]
    plan = MaskPlan(
        {name: ParamRule("frozen") if name.startswith("0.") else ParamRule("dense") for name in names}
    )
    frozen_before = model[0].weight.detach().clone()
    opt = ForgetAdamW(model.named_parameters(), plan=plan, lr=1e-2)
    run(model, opt, steps=3)
    assert torch.equal(model[0].weight, frozen_before)
    assert all(
        id(p) not in map(id, (model[0].weight, model[0].bias)) for g in opt.param_groups for p in g["params"]
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_active_plan_holds_parameters_and_keeps_their_moments(backend: str) -> None:
    """HFT resampling: a parameter the active plan freezes must neither move nor change its Adam
    moments while held, and must train again (from the kept moments) once the plan trains it."""
    model = make_model()
    names = [name for name, _ in model.named_parameters()]
    membership = MaskPlan({name: ParamRule("dense") for name in names})
    held = MaskPlan(
        {name: ParamRule("frozen") if name.startswith("0.") else ParamRule("dense") for name in names}
    )
    opt = ForgetAdamW(model.named_parameters(), plan=membership, lr=1e-2, weight_decay=0.1, backend=backend)
    run(model, opt, steps=2)
    opt.set_active_plan(held)
    weight = model[0].weight.detach().clone()
    moments = {k: opt.state[model[0].weight][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    other = model[1].weight.detach().clone()
    run(model, opt, steps=2)
    assert torch.equal(model[0].weight, weight)
    for key, value in moments.items():
        assert torch.equal(opt.state[model[0].weight][key], value), key
    assert not torch.equal(model[1].weight, other)
    opt.set_active_plan(membership)
    run(model, opt, steps=1)
    assert not torch.equal(model[0].weight, weight)
    assert opt.state_dict()["dsforget"]["plan_digest"] == membership.digest


# (phase steps, the parameters held in it): "a" is held for 40 steps between trained phases, "b"
# for 3, so their moment-update counts differ both ways while they share a shard; "c" is held
# (never updated: count 0) until the fourth phase.
RESAMPLING_PHASES = [(3, ("c",)), (40, ("a", "c")), (5, ("c",)), (3, ("b",)), (4, ())]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sharing", ["own-shards", "one-flat-shard"])
@pytest.mark.parametrize(
    "rule", [ParamRule("dense"), ParamRule("topk", fraction=1.0)], ids=["dense", "topk1"]
)
def test_held_parameter_resumes_with_its_own_adam_step(rule: ParamRule, sharing: str, backend: str) -> None:
    """Issue 15 item 3: the Adam step count of a parameter held by HFT resampling must stop while
    it is held. Each parameter must follow a torch.optim.AdamW stepped only on the steps it trained
    (after 40 held steps, "a" resumes at its own step 4, not the shard's step 44). Catches the
    per-shard `state["step"]` bias-correcting moments that saw 3 updates as if they saw 43 (a
    2.5-5x step), in the per-parameter shards of a run without ZeRO and in one flat ZeRO-style
    shard holding both matrices (mixed counts in one shard), for every CPU backend."""
    from dsforget.optim.layout import Segment, ShardLayout

    generator = torch.Generator().manual_seed(7)
    shapes = {"a": (7, 5), "b": (6, 5), "c": (4,)}
    start = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    params = {name: nn.Parameter(value.clone()) for name, value in start.items()}
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    membership = MaskPlan({name: rule for name in shapes})
    opt = ForgetAdamW(params.items(), plan=membership, backend=backend, **hyper)
    offsets = {"a": 0, "b": 38, "c": 69}  # padding between them and at the end, as ZeRO aligns
    flat = None
    if sharing == "one-flat-shard":
        flat = nn.Parameter(torch.zeros(75))
        for name, value in start.items():
            flat.data[offsets[name] : offsets[name] + value.numel()] = value.flatten()
        layout = ShardLayout(
            numel=75,
            segments=tuple(Segment(n, 0, offsets[n], start[n].numel(), shapes[n][-1]) for n in shapes),
            group_params=tuple((n, start[n].numel()) for n in shapes),
        )
        opt.param_groups[0]["params"] = [flat]  # as DeepSpeed hands the optimizer its partition
        opt.bind([(flat, layout)])
    references = {name: nn.Parameter(value.clone()) for name, value in start.items()}
    reference_opts = {name: torch.optim.AdamW([references[name]], **hyper) for name in shapes}
    for steps, held in RESAMPLING_PHASES:
        rules = {name: ParamRule("frozen") if name in held else rule for name in shapes}
        opt.set_active_plan(MaskPlan(rules))
        for _ in range(steps):
            grads = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
            if flat is None:
                for name, grad in grads.items():
                    params[name].grad = grad.clone()  # a held parameter still has a gradient
            else:
                flat.grad = torch.zeros(75)
                for name, grad in grads.items():
                    flat.grad[offsets[name] : offsets[name] + grad.numel()] = grad.flatten()
            opt.step()
            for name in shapes:
                if name not in held:
                    references[name].grad = grads[name].clone()
                    reference_opts[name].step()
    for name, shape in shapes.items():
        ours = params[name].detach()
        if flat is not None:
            ours = flat.detach()[offsets[name] : offsets[name] + ours.numel()].view(shape)
        assert not torch.equal(ours, start[name])
        torch.testing.assert_close(
            ours, references[name].detach(), rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
        )
    counts = opt.state[flat if flat is not None else params["a"]]["param_steps"]
    assert counts == ([15, 52, 7] if flat is not None else [15])


def test_active_plan_cannot_train_what_the_optimizer_dropped() -> None:
    model = make_model()
    names = [name for name, _ in model.named_parameters()]
    frozen_first = MaskPlan(
        {n: ParamRule("frozen") if n.startswith("0.") else ParamRule("dense") for n in names}
    )
    opt = ForgetAdamW(model.named_parameters(), plan=frozen_first)
    with pytest.raises(PlanError, match=r"trains 2 parameter\(s\) this optimizer was built without"):
        opt.set_active_plan(MaskPlan({name: ParamRule("dense") for name in names}))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m: MoFOAdamW(m.parameters(), fraction=0.0), r"fraction must be in \(0, 1\], got 0.0"),
        (lambda m: MoFOAdamW(m.parameters(), fraction=1.5), r"fraction must be in \(0, 1\], got 1.5"),
        (
            lambda m: MoFOAdamW(m.parameters(), topk="global"),
            r"topk='global' is not supported; allowed: exact, shard",
        ),
        (lambda m: MoFOAdamW(m.parameters(), decay_scope="x"), r"decay_scope='x' is not supported"),
        (lambda m: MoFOAdamW(m.parameters(), lr=-1.0), r"lr must be >= 0"),
        (lambda m: MoFOAdamW([]), r"empty parameter list"),
        (
            lambda m: ForgetAdamW(m.named_parameters(), plan=MaskPlan({"0.weight": ParamRule("dense")})),
            r"has no rule for parameter '0.bias'",
        ),
        (
            lambda m: ForgetAdamW(
                m.named_parameters(), plan=MaskPlan({n: ParamRule("frozen") for n, _ in m.named_parameters()})
            ),
            r"freezes every parameter",
        ),
        (
            lambda m: ForgetAdamW(
                m.named_parameters(), plan=dsforget.plan_for(m, "l2", strength=200.0), lr=0.01
            ),
            r"pull 200.0 \(l2 strength\) x lr 0.01 of '0.weight' is above 1",
        ),
    ],
)
def test_bad_optimizer_arguments_are_named(make, message: str) -> None:
    with pytest.raises((ValueError, PlanError), match=message):
        make(make_model())


def test_tensor_without_layout_is_refused() -> None:
    """A flat partition handed over by deepspeed.initialize (not dsforget.initialize) must not
    be silently treated as a parameter."""
    model = make_model()
    opt = MoFOAdamW(model.named_parameters())
    flat = nn.Parameter(torch.zeros(10))
    flat.grad = torch.ones(10)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(
        RuntimeError, match="use dsforget.initialize|build the engine with dsforget.initialize"
    ):
        opt.step()


def test_kernels_are_resolved_when_bound_not_mid_training(monkeypatch) -> None:
    """Catches a C++ build (and its failure) deferred to the middle of training: binding the
    optimizer to its shards resolves the backend for their device before any step, once per
    device type, and the steps then use what was resolved."""
    from dsforget.optim import optimizer as optimizer_module
    from dsforget.optim.layout import ShardLayout

    calls = []

    def spy(requested, device):
        calls.append((requested, torch.device(device).type))
        return "torch"

    monkeypatch.setattr(optimizer_module, "resolve_backend", spy)
    weights = {name: nn.Parameter(torch.randn(5, 3)) for name in ("a", "b")}
    optimizer = MoFOAdamW(weights.items(), backend="auto")
    assert calls == []
    optimizer.bind([(w, ShardLayout.whole(name, (5, 3))) for name, w in weights.items()])
    assert calls == [("auto", "cpu")]
    for w in weights.values():
        w.grad = torch.randn(5, 3)
    optimizer.step()
    assert calls == [("auto", "cpu")]


def test_backend_cpu_without_a_compiler_fails_before_the_first_step(monkeypatch) -> None:
    """backend="cpu" where the extension cannot be built is an error when the optimizer is
    bound (naming the missing compiler), not a silent fall back to the slow references."""
    from dsforget.kernels import _cpu

    from dsforget.optim.layout import ShardLayout

    monkeypatch.setenv("CXX", "no-such-compiler-dsforget")
    monkeypatch.setattr(_cpu, "_OPS", None)
    monkeypatch.setattr(_cpu, "_FAILURE", None)
    weight = nn.Parameter(torch.randn(4, 4))
    optimizer = MoFOAdamW([("w", weight)], backend="cpu")
    with pytest.raises(RuntimeError, match="no-such-compiler-dsforget"):
        optimizer.bind([(weight, ShardLayout.whole("w", (4, 4)))])


def _fail_the_build(monkeypatch) -> str:
    """The compiler reports an error: torch's cpp_extension.load raises what a failed g++ run raises."""
    import torch.utils.cpp_extension

    def load(**_):
        raise RuntimeError(
            "Error building extension:\nkernels/csrc/radix.cpp:7:3: error: 'boom' was not declared"
        )

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    return "radix.cpp:7:3: error: 'boom' was not declared"


def _remove_the_compiler(monkeypatch) -> str:
    monkeypatch.setenv("CXX", "no-such-compiler-for-auto")
    return "'no-such-compiler-for-auto' ($CXX, default c++) is not on PATH"


@pytest.mark.parametrize(
    "break_cpu_kernels", [_fail_the_build, _remove_the_compiler], ids=["build-fails", "no-compiler"]
)
def test_auto_falling_back_is_one_warning_with_the_reason(monkeypatch, caplog, break_cpu_kernels) -> None:
    """Catches a fallback from the C++ kernels to the slow references that only an INFO line (or
    nothing) reports, a WARNING that omits the compiler's message, and one repeated for every
    optimizer built or step taken: three optimizers x three steps give exactly one WARNING naming
    the backend wanted, the one used and the reason, and the steps still train."""
    from dsforget.kernels import _cpu, backends

    reason = break_cpu_kernels(monkeypatch)
    monkeypatch.setattr(_cpu, "_OPS", None)
    monkeypatch.setattr(_cpu, "_FAILURE", None)
    monkeypatch.setattr(backends, "_WARNED", set())
    with caplog.at_level(logging.INFO, logger="dsforget"):
        for seed in range(3):
            model = make_model(seed)
            before = [p.detach().clone() for p in model.parameters()]
            run(model, MoFOAdamW(model.named_parameters(), lr=1e-2, fraction=0.3), steps=3)
            assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert reason in warnings[0], warnings[0]
    assert "backend \"auto\" wanted 'cpu'" in warnings[0] and "(backend 'torch') run instead" in warnings[0]


def test_an_explicit_torch_backend_is_honoured_quietly(monkeypatch, caplog) -> None:
    """Catches the references the user asked for being reported as a fallback (a WARNING where
    nothing went wrong): backend="torch" is one INFO line, even where the C++ kernels cannot build."""
    from dsforget.kernels import _cpu, backends

    _remove_the_compiler(monkeypatch)
    monkeypatch.setattr(_cpu, "_OPS", None)
    monkeypatch.setattr(_cpu, "_FAILURE", None)
    monkeypatch.setattr(backends, "_WARNED", set())
    with caplog.at_level(logging.INFO, logger="dsforget"):
        model = make_model()
        run(model, MoFOAdamW(model.named_parameters(), fraction=0.3, backend="torch"), steps=2)
    assert [r.levelno for r in caplog.records] == [logging.INFO], caplog.text
    assert "uses the 'torch' kernels on cpu tensors" in caplog.records[0].getMessage()
