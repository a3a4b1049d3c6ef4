"""The baselines under the job: freeze and l2 on 2 CPU ranks, ZeRO-2 and ZeRO-3, the tiny lab."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launcher import REPO
from safetensors.torch import load_file
from test_finetune import finetune, metrics
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.distributed

RUN = [
    *("--max_steps", "4", "--save_every", "2", "--keep_checkpoints", "2", "--lr", "3e-3"),
    *("--lr_schedule", "constant", "--warmup_steps", "0", "--log_every", "1", "--eval_max_examples", "8"),
]
# the last layer trains, everything else (embeddings, layer 0, final norm) stays the base model's
FREEZE = {"trainable_layers": 1}
# lr 3e-3 x 50: 15% of the distance to w0 per step, so a wrong w0 after a resume shows
L2 = {"strength": 50.0}
CASES = [("freeze", FREEZE, 2), ("freeze", FREEZE, 3), ("l2", L2, 2), ("l2", L2, 3)]


def base_weights(lab_cache: Path, monkeypatch) -> dict[str, torch.Tensor]:
    """The tiny lab's base model (already built by the run, so read from the cache)."""
    from dsforget.lab import build_lab
    from dsforget.lab.config import LabConfig

    monkeypatch.setenv("DSFORGET_CACHE", str(lab_cache))
    model_dir = build_lab(LabConfig.preset("tiny")).model_dir
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


@pytest.mark.parametrize(("method", "options", "stage"), CASES, ids=[f"{m}-zero{s}" for m, _, s in CASES])
def test_baseline_trains_resumes_exactly_and_exports(
    method: str, options: dict, stage: int, tmp_path: Path, lab_cache: Path, monkeypatch
) -> None:
    """A run of 4 steps, then the same run rewound to its step-2 checkpoint: the same losses,
    exported weights and report (moments, step, data position and, for l2, w0 from the
    checkpoint). The export loads with from_pretrained; freeze leaves every parameter it does not
    name bit-identical to the base; l2 keeps one fp32 copy of w0 beside the two moments."""
    flags = [
        *("--method", method, "--method_options", json.dumps(options)),
        *("--deepspeed", str(REPO / "configs" / f"zero{stage}.json"), *RUN),
    ]
    run = tmp_path / "run"
    finetune(run, lab_cache, *flags)
    straight_losses = [m["loss"] for m in metrics(run) if "loss" in m]
    straight = load_file(run / "hf_model" / "model.safetensors")
    report = json.loads((run / "report.json").read_text())
    finetune(run, lab_cache, *flags, "--resume", str(run / "checkpoints" / "step2"))
    resumed_losses = [m["loss"] for m in metrics(run) if "loss" in m and m.get("step", 0) > 2]
    assert resumed_losses[-2:] == straight_losses[2:]
    resumed = load_file(run / "hf_model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    again = json.loads((run / "report.json").read_text())
    assert again["after"] == report["after"] and again["drift"] == report["drift"]

    exported = AutoModelForCausalLM.from_pretrained(run / "hf_model", dtype=torch.float32).state_dict()
    base = base_weights(lab_cache, monkeypatch)
    plan = json.loads((run / "plan.json").read_text())["params"]  # tied weights named once
    moved = {name for name in plan if not torch.equal(exported[name], base[name])}
    trained = {name for name, rule in plan.items() if rule["mode"] != "frozen"}
    assert moved == trained, (sorted(moved ^ trained), "freeze must train exactly what it names")
    if method == "freeze":
        assert trained and all(".layers.1." in name for name in trained), trained
        assert report["trainable_share"] < 0.5
    else:  # w0, m and v: 12 bytes per parameter, halved over 2 ranks (ZeRO padding aside)
        entries = sum(base[name].numel() for name in plan)
        state_bytes = report["train"]["optimizer_state_mib_per_rank"] * 2**20  # rounded to 1/1000 MiB
        assert abs(state_bytes - 12 * entries / 2) < 0.01 * 12 * entries / 2 + 2**10, (state_bytes, entries)


def test_compare_puts_the_baselines_beside_full(compared) -> None:
    """compare.py takes freeze and l2 like any method, each with its own --method_options (a
    shared option would be refused by full): a row each, and the costs they must show.
    (conftest's `compared` runs them beside full and the other compare tests' methods.)"""
    tmp_path, done = compared.output, compared.done
    assert compared.row_names(("full", "freeze", "l2")) == {"full", "freeze", "l2"}, done.stdout[-3000:]
    reports = json.loads((tmp_path / "compare.json").read_text())
    options = {
        m: json.loads((tmp_path / m / "config.json").read_text())["method_options"]
        for m in ("full", "freeze", "l2")
    }
    assert options == {"full": {}, "freeze": {"trainable_layers": 1}, "l2": {"strength": 10}}
    memory = {m: reports[m]["train"]["optimizer_state_mib_per_rank"] for m in reports}
    assert memory["l2"] == pytest.approx(1.5 * memory["full"], rel=0.01), memory  # w0 beside m and v
    assert memory["freeze"] < 0.5 * memory["full"] and reports["freeze"]["trainable_share"] < 0.5, memory
