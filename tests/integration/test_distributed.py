"""Sharding invariance: real 2-rank gloo DeepSpeed runs against a dense single-process run.

Each configuration names the baseline it must equal. Data is drawn once with shape
(steps, world, micro_batch, seq); the dense run trains on all of it, rank r on column r.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch
from launcher import REPO, RankFailure, run_ranks
from tiny import TinyLM, batches, initial_state, train_dense

import dsforget

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 4
MICRO_BATCH = 3
WORKER = str(REPO / "tests" / "workers" / "train_tiny.py")


@dataclass(frozen=True)
class Config:
    name: str
    stage: int
    method: str = "mofo"
    options: dict = field(default_factory=lambda: {"fraction": 0.3})
    topk: str = "exact"
    offload: bool = False
    weight_decay: float = 0.0
    lr: float = 1e-2
    dropin: bool = False
    backend: str = "auto"  # the C++ path on CPU tensors; "torch" = references; "triton" = interpreter
    plain: bool = False  # built by deepspeed.initialize: the optimizer finds its layouts itself
    resample_every: int = 0  # HFT redrawn every N steps (dsforget.methods.resampling)
    family: str = "llama"  # "phi3": fused qkv_proj / gate_up_proj, HFT freezes row blocks of them


# every q/k/v/up/down matrix trains with row scales 1 - importance (all layers: both of TinyLM's)
COFITUNE = {"layers": "all", "modules": "both", "importance": "random"}
# TinyLM's last layer's FFN and the LM head train; the rest (embeddings, layer 0, norms) is frozen
FREEZE = {"trainable_layers": 1, "trainable_modules": "mlp", "extra_modules": "lm_head"}
# strong enough (lr 1e-2 x 20 = a fifth of the distance per step) that a wrong w0 would show
L2 = {"strength": 20.0}

MATRIX = [
    Config("no-zero", stage=0),
    Config("zero1", stage=1, weight_decay=0.1),
    Config("zero2", stage=2),
    Config("zero3", stage=3, weight_decay=0.1),
    Config("zero3-offload", stage=3, offload=True),
    Config("zero2-full", stage=2, method="full", options={}),
    Config("zero3-mofo-dropin", stage=3, dropin=True),
    Config("zero3-torch-path", stage=3, backend="torch"),
    Config("zero2-triton-in-the-interpreter", stage=2, backend="triton"),
    Config("zero2-plain-deepspeed-initialize", stage=2, plain=True),
    Config("zero3-plain-deepspeed-initialize", stage=3, plain=True, weight_decay=0.1),
    Config("zero3-hft", stage=3, method="hft", options={"seed": 3}, weight_decay=0.1),
    Config("zero2-hft+mofo", stage=2, method="hft+mofo", options={"seed": 1, "fraction": 0.3}),
    Config("zero3-offload-hft+mofo", stage=3, offload=True, method="hft+mofo", options={"seed": 2}),
    # matrices held in one draw and trained in the next: each one's Adam step count, split over ranks
    Config(
        "zero2-hft-resampled", stage=2, method="hft", options={"seed": 3}, weight_decay=0.1, resample_every=2
    ),
    Config("zero3-hft+mofo-resampled", stage=3, method="hft+mofo", options={"seed": 1}, resample_every=2),
    Config("zero3-cofitune-rowscale", stage=3, method="cofitune", options=COFITUNE, weight_decay=0.1),
    Config("zero2-cofitune+mofo", stage=2, method="cofitune+mofo", options={**COFITUNE, "fraction": 0.3}),
    Config("zero3-offload-cofitune+mofo", stage=3, offload=True, method="cofitune+mofo", options=COFITUNE),
    Config("zero2-freeze", stage=2, method="freeze", options=FREEZE, weight_decay=0.1),
    Config("zero3-freeze+mofo", stage=3, method="freeze+mofo", options={**FREEZE, "fraction": 0.3}),
    Config("zero1-l2", stage=1, method="l2", options=L2, weight_decay=0.1),
    Config("zero2-l2", stage=2, method="l2", options=L2),
    Config("zero3-l2", stage=3, method="l2", options=L2, weight_decay=0.1),
    Config("zero3-offload-l2+mofo", stage=3, offload=True, method="l2+mofo", options={**L2, "fraction": 0.3}),
    # seed 3 freezes [0, 56) and [84, 112) of layer 0's qkv_proj (q and v), odd rows cut mid-shard
    Config("zero2-phi3-hft", stage=2, method="hft", options={"seed": 3}, weight_decay=0.1, family="phi3"),
    Config("zero3-phi3-hft", stage=3, method="hft", options={"seed": 3}, weight_decay=0.1, family="phi3"),
    Config("zero3-phi3-hft+mofo", stage=3, method="hft+mofo", options={"seed": 1}, family="phi3"),
]


def importance_file(directory: Path) -> str:
    """Random unit importance for TinyLM (2 layers, 4 heads, 98 FFN neurons, hidden 56)."""
    from dsforget.methods.cofitune.importance import UnitImportance

    generator = torch.Generator().manual_seed(5)
    shapes = {"heads": (2, 4), "intermediate": (2, 98), "hidden": (2, 56)}
    tensors = {k: torch.rand(shape, generator=generator) * 0.9 for k, shape in shapes.items()}
    path = directory / "importance.safetensors"
    UnitImportance(**tensors, meta={"source": "random (test)"}).save(path)
    return str(path)


def method_options(config: Config, directory: Path) -> dict:
    """The config's options, with a CoFiTune importance file written when one is asked for."""
    if config.options.get("importance") == "random":
        return {**config.options, "importance": importance_file(directory)}
    return dict(config.options)


def write_spec(config: Config, directory: Path, steps: int = STEPS, **extra) -> dict:
    """The worker's spec of one run, its initial weights and data written into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(initial_state(family=config.family), directory / "init.pt")
    torch.save(batches(steps, WORLD, MICRO_BATCH), directory / "data.pt")
    return {
        **asdict(config),
        **extra,
        "options": method_options(config, directory),
        "fraction": config.options.get("fraction", 1.0),
        "micro_batch": MICRO_BATCH,
        "init": str(directory / "init.pt"),
        "data": str(directory / "data.pt"),
        "out": str(directory / "out.pt"),
    }


def run_specs(specs: list[dict], spec_file: Path, interpreted: bool, timeout: float = 300) -> None:
    """The runs of `specs` one after another in one 2-rank job."""
    spec_file.write_text(json.dumps(specs))
    env = {"TRITON_INTERPRET": "1"} if interpreted else None
    run_ranks([WORKER, str(spec_file)], WORLD, env=env, timeout=timeout)


def run_config(config: Config, tmp_path: Path, steps: int = STEPS, **extra) -> dict:
    """One run in a job of its own: its final parameters, losses and collective counts."""
    spec = write_spec(config, tmp_path, steps, **extra)
    run_specs([spec], tmp_path / "spec.json", config.backend == "triton")
    return torch.load(tmp_path / "out.pt")


def dense_reference(config: Config, directory: Path, steps: int = STEPS) -> TinyLM:
    model = TinyLM(config.family)
    model.load_state_dict(initial_state(family=config.family))
    hyper = dict(lr=config.lr, weight_decay=config.weight_decay)
    if config.method == "full":
        optimizer = torch.optim.AdamW(model.parameters(), **hyper)
    elif config.resample_every:
        from dsforget.methods.resampling import Resampler

        resampler = Resampler(
            model, config.method, {}, method_options(config, directory), config.resample_every
        )
        plan = resampler.membership_plan()
        optimizer = dsforget.ForgetAdamW(model.named_parameters(), plan=plan, backend="torch", **hyper)
        train_dense(
            model,
            optimizer,
            batches(steps, WORLD, MICRO_BATCH),
            lambda step: resampler.before_step(step, optimizer),
        )
        return model
    else:
        plan = dsforget.plan_for(model, config.method, **method_options(config, directory))
        optimizer = dsforget.ForgetAdamW(model.named_parameters(), plan=plan, backend="torch", **hyper)
    train_dense(model, optimizer, batches(steps, WORLD, MICRO_BATCH))
    return model


def assert_same_parameters(reference: TinyLM, sharded: dict[str, torch.Tensor], lr: float) -> None:
    """Equal to float tolerance; a top-k boundary flip (|diff| ~ lr) is allowed in 1 of 10^4 entries."""
    flips, total, report = 0, 0, []
    for name, param in reference.named_parameters():
        diff = (param.detach() - sharded[name]).abs()
        near = diff <= 1e-5 + 1e-5 * param.detach().abs()
        flips += int((~near).sum())
        total += diff.numel()
        if not near.all():
            report.append(f"{name}: {int((~near).sum())} of {diff.numel()} differ, max {diff.max():.3g}")
        assert diff.max() <= 2 * lr * STEPS, f"{name} differs by {diff.max()}, more than a boundary flip"
    assert flips <= max(1, total // 10_000), "\n".join(report)


@pytest.fixture(scope="module")
def matrix_runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Every MATRIX run, in one 2-rank job per TRITON_INTERPRET setting (start-up is most of a
    tiny run's time: one job per run took ~3x as long): name -> (its directory, its result).
    Each run builds its own model, optimizer and engine; a failing run fails the job, and its
    rank output names the run."""
    root = tmp_path_factory.mktemp("matrix")
    for interpreted in (False, True):
        group = [config for config in MATRIX if (config.backend == "triton") == interpreted]
        specs = [write_spec(config, root / config.name) for config in group]
        run_specs(specs, root / f"specs-{interpreted}.json", interpreted, timeout=120 + 30 * len(group))
    return {config.name: (root / config.name, torch.load(root / config.name / "out.pt")) for config in MATRIX}


@pytest.mark.parametrize("config", MATRIX, ids=[c.name for c in MATRIX])
def test_sharded_run_equals_dense_single_process(config: Config, matrix_runs: dict) -> None:
    """Catches layouts that map shard elements to the wrong parameter entries, top-k taken per
    shard instead of per parameter, row scales tiled from the shard start, and DeepSpeed
    configurations the optimizer silently mis-binds."""
    tmp_path, result = matrix_runs[config.name]
    assert_same_parameters(dense_reference(config, tmp_path), result["params"], config.lr)
    initial = initial_state(family=config.family)
    moved = [name for name, p in result["params"].items() if not torch.equal(p, initial[name])]
    if config.resample_every:  # what trains in any of the run's draws
        from dsforget.methods.resampling import Resampler

        resampler = Resampler(
            TinyLM(), config.method, {}, method_options(config, tmp_path), config.resample_every
        )
        plans = [resampler.plan_of_draw(draw) for draw in range(-(-STEPS // config.resample_every))]
    else:
        plans = [dsforget.plan_for(TinyLM(config.family), config.method, **method_options(config, tmp_path))]
    names = [name for name, _ in TinyLM(config.family).named_parameters()]
    frozen = [name for name in names if not any(plan[name].trains for plan in plans)]
    assert not set(frozen) & set(moved), "frozen parameters must stay bit-identical to the base"
    for name, rule in plans[0].rules.items():  # the frozen row blocks of a fused matrix too
        for start, stop in rule.frozen_rows or ():
            assert torch.equal(result["params"][name][start:stop], initial[name][start:stop]), name
    trained = [name for name in names if name not in frozen and name != "never_used"]
    assert set(trained) <= set(moved), "every trained parameter with a gradient must move"
    assert ("never_used" in moved) == (config.weight_decay > 0 and "never_used" not in frozen), (
        "only weight decay moves a gradient-free param"
    )


def test_shard_mode_selects_per_rank_slice(tmp_path: Path) -> None:
    """Shard mode must pick the top fraction of each rank's own ZeRO-3 slice (the MoFO reference
    code's behaviour), not of the whole parameter: after one step from zero moments, each
    slice of a filtered matrix changes in exactly max(1, floor(fraction * slice length)) entries."""
    config = Config("zero3-shard", stage=3, topk="shard", options={"fraction": 0.25})
    result = run_config(config, tmp_path, steps=1)
    initial = initial_state()
    for name in ("llama.model.layers.0.mlp.down_proj.weight", "llama.lm_head.weight"):
        changed = (result["params"][name] != initial[name]).flatten()
        slice_len = -(-changed.numel() // WORLD)
        for rank in range(WORLD):
            piece = changed[rank * slice_len : (rank + 1) * slice_len]
            assert int(piece.sum()) == max(1, int(0.25 * piece.numel())), (name, rank)


def test_rank_with_other_plan_fails_fast(tmp_path: Path) -> None:
    """A rank that built its own plan (other fraction) must stop before training, naming itself."""
    config = Config("mismatch", stage=2)  # its fraction, 0.3, is what rank 0 keeps
    spec = write_spec(config, tmp_path, steps=1, corrupt_plan_on_rank=1)
    with pytest.raises(RankFailure) as failure:
        run_specs([spec], tmp_path / "spec.json", interpreted=False, timeout=120)
    assert failure.value.ranks == [0, 1]
    assert "rank(s) [1] hold a plan whose digest differs from rank 0" in failure.value.outputs[0]
    assert not (tmp_path / "out.pt").exists()


RESUMED = [
    Config("zero2-resume", stage=2, weight_decay=0.1),
    Config("zero3-resume", stage=3, weight_decay=0.1),
    Config("zero2-l2-resume", stage=2, method="l2", options=L2),
    Config("zero3-l2-resume", stage=3, method="l2", options=L2, weight_decay=0.1),
    Config("zero3-freeze-resume", stage=3, method="freeze", options=FREEZE),
]


@pytest.mark.parametrize("config", RESUMED, ids=[c.name for c in RESUMED])
def test_deepspeed_checkpoint_resumes_bit_identically(config: Config, tmp_path: Path) -> None:
    """DeepSpeed's own save/load_checkpoint must carry ForgetAdamW's moments and step count
    through every ZeRO layout: resuming after step 2 of 4 gives the uninterrupted parameters.
    For l2 it must carry w0 too: a resumed run that pulled towards the weights it resumed from
    (step 2's) would end elsewhere."""
    checkpoints = tmp_path / "checkpoints"
    straight = run_config(config, tmp_path, save_after=2, checkpoint_dir=str(checkpoints))
    resumed = run_config(config, tmp_path, resume_from=str(checkpoints))
    assert len(resumed["losses"]) == STEPS - 2
    assert resumed["losses"] == straight["losses"][2:]
    for name, param in straight["params"].items():
        assert torch.equal(param, resumed["params"][name]), name


def test_row_scales_add_no_collective(tmp_path: Path) -> None:
    """CoFiTune's fine level scales each rank's own gradient shard: the same coarse selection with
    and without importance row scales must issue exactly the same collectives at every step (the
    reference implementation all-gathers every masked weight twice per micro-step)."""
    coarse = {"layers": "all", "modules": "both"}
    counts = {}
    for name, options in (("coarse", coarse), ("rowscale", {**coarse, "importance": "random"})):
        config = Config(name, stage=3, method="cofitune", options=options)
        directory = tmp_path / name
        directory.mkdir()
        counts[name] = run_config(config, directory, count_collectives=True)["collectives"]
    per_step = {name: [b - a for a, b in itertools.pairwise(c)] for name, c in counts.items()}
    assert per_step["coarse"] and all(n > 0 for n in per_step["coarse"]), per_step
    assert per_step["rowscale"] == per_step["coarse"], per_step
