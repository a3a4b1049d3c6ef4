"""Checkpoints in one process, with a stub engine that writes files as DeepSpeed would: which
checkpoint is the newest after fresh starts and rewinds, what is fsynced before COMPLETE, what a
save cut short leaves, RNG files that cannot run code, the accelerator RNG, the atomic model
export, the resumed optimizer's hyperparameters and JSON without NaN.

On the code before issue 15 (checkpoints ordered by step, saved in place, RNG pickled with
numpy arrays and read with ``weights_only=False``, hf_model deleted before the new one is
renamed in, the checkpoint's lr kept on resume, bare NaN in report.json) every test here fails;
each docstring says how.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dsforget import atomic
from dsforget.integration import export
from dsforget.optim.plan import DENSE, MaskPlan
from dsforget.train import checkpoint
from dsforget.train.finetune import set_aside_previous_run
from dsforget.train.job import apply_hyperparameters, lr_factor
from dsforget.train.run_config import RunConfig

PLAN = MaskPlan({"w": DENSE}, method="full")


@pytest.fixture(autouse=True)
def one_rank(monkeypatch) -> None:
    from deepspeed import comm

    monkeypatch.setattr(comm, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(comm, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(comm, "barrier", lambda group=None: None)


class Engine:
    """Writes and reads a checkpoint's files where DeepSpeed would; `crash` stops it mid-write."""

    crash = False

    def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
        directory = Path(root) / tag
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"m" * 64)
        if self.crash:
            raise KeyboardInterrupt("killed while DeepSpeed writes")
        (directory / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * 64)

    def load_checkpoint(self, root: str, tag: str) -> tuple[str | None, dict]:
        directory = Path(root) / tag
        ok = (directory / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists()
        return (str(directory), {}) if ok else (None, {})


def save(root: Path, step: int, parent: Path | None, keep: int = 2, engine: Engine | None = None) -> Path:
    state = checkpoint.TrainerState(step, 0, step)
    return checkpoint.save(engine or Engine(), root, state, PLAN, keep=keep, parent=parent)


def run(root: Path, steps: list[int], parent: Path | None = None, keep: int = 2) -> list[Path]:
    """Save `steps` in order as one run continuing `parent`; returns the directories."""
    saved = []
    for step in steps:
        parent = save(root, step, parent, keep)
        saved.append(parent)
    return saved


def steps(root: Path) -> list[str]:
    return [path.name for path in checkpoint.complete_checkpoints(root)]


# --- which checkpoint is the newest (issue 15, item 1) ----------------------------------------


def test_fresh_start_over_an_old_run_is_what_resume_continues(tmp_path: Path) -> None:
    """A run saving steps 2, 4, 6, then a fresh start (--resume never) saving 1 and 2 in the same
    output_dir. Catches checkpoints ordered by step: the new run's were pruned as soon as written
    and --resume auto continued the old run at step 6 (before issue 15: [step4, step6] left)."""
    output = tmp_path / "out"
    root = output / "checkpoints"
    run(root, [2, 4, 6])
    (output / "metrics.jsonl").write_text('{"step": 6, "loss": 1.0}\n')
    (output / "report.json").write_text("{}")
    aside = set_aside_previous_run(output)
    assert aside is not None and aside.name.startswith("superseded-")
    assert steps(aside / "checkpoints") == ["step4", "step6"]  # the old run, whole, out of the way
    assert (aside / "metrics.jsonl").exists() and (aside / "report.json").exists()
    assert not (output / "metrics.jsonl").exists() and not (output / "report.json").exists()
    new = run(root, [1, 2])
    assert checkpoint.latest_checkpoint(root) == new[-1] and steps(root) == ["step1", "step2"]
    assert set_aside_previous_run(tmp_path / "empty") is None


def test_fresh_start_without_setting_aside_still_wins(tmp_path: Path) -> None:
    """A run from the base model saving into a checkpoints/ folder that still holds an older run's
    (library use, no --resume never): its saves are newer by sequence, so they are kept and
    resumed. Catches ordering by step (step 2 of the new run is older than the old step 6)."""
    root = tmp_path / "checkpoints"
    run(root, [2, 4, 6])
    new = run(root, [1, 2])
    assert checkpoint.complete_checkpoints(root) == new and checkpoint.latest_checkpoint(root) == new[-1]


def test_rewind_to_an_older_step_makes_the_new_checkpoints_newest(tmp_path: Path) -> None:
    """--resume checkpoints/step2 after a run saved 2, 4, 6 (keep 3): the rewound run's step 4
    must be what the next --resume auto continues, and the abandoned step 6 must go. Catches
    pruning by step (before issue 15 the old step 6 stayed the newest, and step 4 was saved in
    place over the old one)."""
    root = tmp_path / "checkpoints"
    old = run(root, [2, 4, 6], keep=3)
    rewound = run(root, [4], parent=old[0], keep=3)
    assert checkpoint.complete_checkpoints(root) == [old[0], rewound[0]]
    assert checkpoint.latest_checkpoint(root) == rewound[0] != root / "step4"
    more = run(root, [6], parent=rewound[0], keep=3)
    assert checkpoint.complete_checkpoints(root) == [old[0], rewound[0], more[0]]


def test_changed_save_cadence_on_a_rewind_keeps_the_new_run(tmp_path: Path) -> None:
    """A run with save_every 3 (keep 2 leaves steps 6, 9), rewound to step 6 with save_every 2:
    its step 8 must be the newest, not the abandoned step 9 (before issue 15: [step8, step9],
    and --resume auto took step 9)."""
    root = tmp_path / "checkpoints"
    run(root, [3, 6, 9])
    rewound = run(root, [8], parent=root / "step6")
    assert steps(root) == ["step6", "step8"] and checkpoint.latest_checkpoint(root) == rewound[0]


def test_keep_one_resumed_at_its_last_step_always_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    """keep_checkpoints 1, a run resumed from its only checkpoint (step 6) saving step 6 again and
    killed while DeepSpeed writes: step 6 must still be complete and loadable. Catches saving over
    a complete tag in place (before issue 15 its marker went first: no complete checkpoint left)."""
    root = tmp_path / "checkpoints"
    (first,) = run(root, [6], keep=1)
    crashing = Engine()
    crashing.crash = True
    with pytest.raises(KeyboardInterrupt):
        save(root, 6, parent=first, keep=1, engine=crashing)
    assert checkpoint.latest_checkpoint(root) == first
    assert checkpoint.load(Engine(), first).step == 6
    again = save(root, 6, parent=first, keep=1)
    assert checkpoint.complete_checkpoints(root) == [again] and again != first
    assert sorted(path.name for path in root.iterdir()) == [again.name]  # the cut-short one removed


# --- durability (item 4) ------------------------------------------------------------------------


def test_every_file_and_directory_is_fsynced_before_complete_and_pruning_comes_last(
    tmp_path: Path, monkeypatch
) -> None:
    """Catches a COMPLETE marker that can be durable while DeepSpeed's files, the RNG files or
    plan.json are not (before issue 15 only trainer.json and COMPLETE were fsynced), a directory
    entry never fsynced, and older checkpoints deleted before the new marker is durable."""
    root = tmp_path / "out" / "checkpoints"
    (old,) = run(root, [2], keep=1)
    events: list[tuple[str, str, bool]] = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", path, (root / "step4" / checkpoint.COMPLETE).exists()))
        fsync(fd)

    remove = checkpoint._remove

    def recording_remove(directory: Path) -> None:
        events.append(("remove", str(directory), (root / "step4" / checkpoint.COMPLETE).exists()))
        remove(directory)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(checkpoint, "_remove", recording_remove)
    new = save(root, 4, parent=old, keep=1)
    before_marker = {path for kind, path, complete in events if kind == "fsync" and not complete}
    files = [path for path in new.iterdir() if path.name != checkpoint.COMPLETE]
    assert {p.name for p in files} >= {"plan.json", "trainer.json", "rng_rank0.pt"}
    for path in [*files, new, root, root.parent]:
        assert str(path.resolve()) in before_marker, f"{path} not fsynced before {checkpoint.COMPLETE}"
    marker_synced = [i for i, (kind, path, _) in enumerate(events) if kind == "fsync" and "COMPLETE" in path]
    removed = [i for i, (kind, path, _) in enumerate(events) if kind == "remove" and path == str(old)]
    assert marker_synced and removed and marker_synced[0] < removed[0]
    assert all(complete for kind, _, complete in events if kind == "remove")


@pytest.mark.parametrize("dies", ["after-complete", "mid-write"])
def test_a_save_that_dies_leaves_step_n_or_the_previous_checkpoint(tmp_path: Path, monkeypatch, dies) -> None:
    """Fault injection: a save killed right after COMPLETE of step 4 (while pruning) must leave
    step 4 loadable; one killed mid-write must leave step 2, the previous one, the newest."""
    root = tmp_path / "checkpoints"
    (previous,) = run(root, [2], keep=1)
    engine = Engine()
    if dies == "after-complete":

        def killed(*args: Any) -> None:
            raise KeyboardInterrupt("killed after COMPLETE")

        monkeypatch.setattr(checkpoint, "_prune", killed)
    else:
        engine.crash = True
    with pytest.raises(KeyboardInterrupt):
        save(root, 4, parent=previous, keep=1, engine=engine)
    expected = root / "step4" if dies == "after-complete" else previous
    assert checkpoint.latest_checkpoint(root) == expected
    assert checkpoint.load(Engine(), expected).step == int(expected.name[4:])


def _model_complete(directory: Path) -> bool:
    return (directory / "config.json").exists() and (directory / "model.safetensors").exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-aside"])
def test_hf_export_replaces_the_model_without_a_window(tmp_path: Path, monkeypatch, exchange: bool) -> None:
    """Re-exporting over hf_model/: after every filesystem step a complete model must exist, at
    hf_model/ itself where the filesystem can exchange directories. Catches the removal of
    hf_model/ before the new one is renamed in (before issue 15: a crash there left no model)."""
    target = tmp_path / "hf_model"
    checks: list[bool] = []

    from transformers import LlamaConfig, LlamaForCausalLM

    class Tokenizer:
        def save_pretrained(self, directory: Path) -> None:
            (Path(directory) / "tokenizer.json").write_text("{}")

    class ExportEngine:  # what save_hf_checkpoint reads of a DeepSpeed engine without ZeRO
        def __init__(self, value: float) -> None:
            config = LlamaConfig(
                vocab_size=8, hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1
            )
            self.module = LlamaForCausalLM(config)
            torch.nn.init.constant_(self.module.lm_head.weight, value)

        def zero_optimization_stage(self) -> int:
            return 0

    export.save_hf_checkpoint(ExportEngine(1.0), Tokenizer(), target)
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)

    def checked(function):
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = function(*args, **kwargs)
            asides = [p for p in tmp_path.iterdir() if p.name.startswith(".hf_model.old")]
            checks.append(_model_complete(target) or (not exchange and any(map(_model_complete, asides))))
            return result

        return wrapper

    monkeypatch.setattr(atomic.os, "replace", checked(os.replace))
    monkeypatch.setattr(atomic.shutil, "rmtree", checked(atomic.shutil.rmtree))
    monkeypatch.setattr(export.shutil, "rmtree", checked(export.shutil.rmtree))
    export.save_hf_checkpoint(ExportEngine(2.0), Tokenizer(), target)
    assert checks and all(checks), checks
    from safetensors.torch import load_file

    assert bool((load_file(target / "model.safetensors")["lm_head.weight"] == 2.0).all())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_model"]


# --- RNG files (items 5 and 6) ------------------------------------------------------------------


class Accelerator:
    """A stand-in for a GPU accelerator: an RNG state of its own, distinct from torch's CPU one."""

    def __init__(self) -> None:
        self.state = torch.arange(16, dtype=torch.uint8)
        self.restored: torch.Tensor | None = None

    def device_name(self) -> str:
        return "cuda"

    def get_rng_state(self) -> torch.Tensor:
        return self.state.clone()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.restored = state


def test_accelerator_rng_is_saved_and_restored(tmp_path: Path, monkeypatch) -> None:
    """Catches a checkpoint holding only the CPU RNG (before issue 15: dropout on the GPU draws
    differently after a resume) and a load that does not hand the saved state back."""
    accelerator = Accelerator()
    monkeypatch.setattr(checkpoint, "_accelerator", lambda: accelerator)
    (saved,) = run(tmp_path / "checkpoints", [2])
    state = torch.load(saved / "rng_rank0.pt", weights_only=True)
    assert torch.equal(state["accelerator"], accelerator.state) and state["accelerator_name"] == "cuda"
    checkpoint.load(Engine(), saved)
    assert accelerator.restored is not None and torch.equal(accelerator.restored, accelerator.state)


def test_cpu_and_accelerator_without_rng_state_resume(tmp_path: Path, monkeypatch) -> None:
    """DeepSpeed's CPU accelerator returns torch's CPU RNG, others may have none: both must save
    and load, and python, numpy and torch draws after load continue as after the save."""

    class Plain:
        def device_name(self) -> str:
            return "cpu"

    monkeypatch.setattr(checkpoint, "_accelerator", lambda: Plain())
    (saved,) = run(tmp_path / "checkpoints", [2])
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoint.load(Engine(), saved)
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert torch.load(saved / "rng_rank0.pt", weights_only=True)["accelerator"] is None
    monkeypatch.undo()  # DeepSpeed's own CPU accelerator
    from deepspeed import comm

    monkeypatch.setattr(comm, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(comm, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(comm, "barrier", lambda group=None: None)
    (cpu,) = run(tmp_path / "cpu", [2])
    saved_state = torch.load(cpu / "rng_rank0.pt", weights_only=True)
    assert torch.equal(saved_state["accelerator"], saved_state["torch"])
    checkpoint.load(Engine(), cpu)


class RunsCode:
    def __reduce__(self):
        return (Path.write_text, (Path(os.environ["DSFORGET_TEST_MARKER"]), "code ran"))


def test_an_rng_file_that_would_run_code_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A checkpoint whose RNG file is a pickle that runs code when loaded: resume must refuse it
    with a message naming the file, and the code must not run (before issue 15 it was read with
    ``weights_only=False``: the marker file appeared)."""
    (saved,) = run(tmp_path / "checkpoints", [2])
    marker = tmp_path / "pwned"
    monkeypatch.setenv("DSFORGET_TEST_MARKER", str(marker))
    torch.save({"python": RunsCode()}, saved / "rng_rank0.pt")
    with pytest.raises(ValueError, match=r"rng_rank0.pt is not a dsforget RNG file: .*could run code"):
        checkpoint.load(Engine(), saved)
    assert not marker.exists()


def test_rng_files_written_before_issue_15_still_load(tmp_path: Path) -> None:
    """Checkpoints saved with the RNG as numpy arrays and tuples (the old format) stay resumable:
    numpy's array type is allowed, nothing that can run code is."""
    (saved,) = run(tmp_path / "checkpoints", [2])
    torch.save(
        {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        saved / "rng_rank0.pt",
    )
    expected = np.random.rand()
    np.random.seed(3)
    checkpoint.load(Engine(), saved)
    assert np.random.rand() == expected


# --- resumed hyperparameters (item 2) -----------------------------------------------------------


def test_resume_applies_this_runs_lr_and_weight_decay() -> None:
    """The optimizer and schedule as DeepSpeed's load_checkpoint leaves them (the saved lr 1e-3,
    weight decay 0) must take this run's lr 5e-4 and weight decay 0.1, the schedule continuing
    from the new peak. Catches a changed --lr silently ignored on resume (issue 15, item 2)."""
    old = RunConfig(lr=1e-3, weight_decay=0.0, warmup_steps=2, max_steps=10)
    new = RunConfig(lr=5e-4, weight_decay=0.1, warmup_steps=2, max_steps=10, betas=(0.8, 0.99))
    weight = torch.nn.Parameter(torch.ones(3))

    def build(config: RunConfig):
        optimizer = torch.optim.AdamW(
            [weight], lr=config.lr, weight_decay=config.weight_decay, betas=config.betas
        )
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, 10))

    optimizer, schedule = build(old)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    saved = optimizer.state_dict(), schedule.state_dict()
    optimizer, schedule = build(new)
    optimizer.load_state_dict(saved[0])  # what DeepSpeed's load_checkpoint does
    schedule.load_state_dict(saved[1])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(old, 10)(4))
    changed = apply_hyperparameters(optimizer, schedule, new)
    assert changed == ["lr 0.001 -> 0.0005", "betas (0.9, 0.999) -> (0.8, 0.99)", "weight_decay 0.0 -> 0.1"]
    factor = lr_factor(new, 10)
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(5e-4 * factor(4)) and group["weight_decay"] == 0.1
    assert tuple(group["betas"]) == (0.8, 0.99)
    optimizer.step()
    schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * factor(5))
    assert apply_hyperparameters(optimizer, schedule, new) == []


# --- JSON (item 11) -----------------------------------------------------------------------------


def strict_loads(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_report_json_holds_no_nan(tmp_path: Path) -> None:
    """A run that trained no step has no step time or loss: report.json must hold null, not the
    bare NaN that strict JSON parsers reject (before issue 15 it wrote ``NaN``)."""
    from dsforget.eval.report import write_report

    report = {
        "method": "mofo",
        "before": {"task_exact_match": 0.1},
        "after": {"task_exact_match": 0.1},
        "summary": {"task_gain": 0.0},
        "drift": {"all": {"relative_l2": float("nan"), "changed_fraction": 0.0}},
        "train": {"median_step_ms": float("nan"), "final_loss": float("inf"), "steps": 6},
    }
    write_report(report, tmp_path)
    written = strict_loads((tmp_path / "report.json").read_text())
    assert written["train"] == {"median_step_ms": None, "final_loss": None, "steps": 6}
    assert written["drift"]["all"]["relative_l2"] is None
