"""LoRA under the job: 2 CPU ranks, ZeRO-2 and ZeRO-3, the tiny lab."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from launcher import REPO
from safetensors.torch import load_file
from test_baselines_job import RUN, base_weights
from test_finetune import finetune, metrics
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.distributed

# dropout on: a resume must restore the RNG the adapters' dropout draws from
LORA = {"rank": 4, "alpha": 12, "dropout": 0.1}
SCALE = 12 / 4
PREFIX = "base_model.model."  # peft's adapter files name tensors as inside a PeftModel


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CASES = [("lora", 2), ("lora+mofo", 3)]  # ZeRO-3 plain lora adds nothing lora+mofo does not cover


@pytest.mark.parametrize(("method", "stage"), CASES, ids=[f"{m}-zero{s}" for m, s in CASES])
def test_lora_trains_resumes_exactly_and_exports(
    method: str, stage: int, tmp_path: Path, lab_cache: Path, monkeypatch
) -> None:
    """4 steps evaluated every 2, then the same run rewound to its step-2 checkpoint: the same
    losses, merged export, adapter and report. The merged export loads with from_pretrained and
    is base + (alpha/rank)·B·A computed here from the adapter file, every other tensor the
    base's bit for bit; the adapter loads with PeftModel.from_pretrained and gives the merged
    model's logits; the base checkpoint's files are untouched; drift compares merged weights."""
    from peft import PeftModel

    from dsforget.lab import build_lab
    from dsforget.lab.config import LabConfig

    flags = [
        *("--method", method, "--method_options", json.dumps(LORA), "--export_adapter"),
        *("--deepspeed", str(REPO / "configs" / f"zero{stage}.json"), *RUN, "--eval_every", "2"),
    ]
    run = tmp_path / "run"
    finetune(run, lab_cache, *flags)
    straight_losses = [m["loss"] for m in metrics(run) if "loss" in m]
    straight = load_file(run / "hf_model" / "model.safetensors")
    straight_adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    report = json.loads((run / "report.json").read_text())
    monkeypatch.setenv("DSFORGET_CACHE", str(lab_cache))
    model_dir = build_lab(LabConfig.preset("tiny")).model_dir
    base_files = {path.name: digest(path) for path in model_dir.iterdir() if path.is_file()}
    finetune(run, lab_cache, *flags, "--resume", str(run / "checkpoints" / "step2"))
    resumed_losses = [m["loss"] for m in metrics(run) if "loss" in m and m.get("step", 0) > 2]
    assert resumed_losses[-2:] == straight_losses[2:]
    for before, after in (
        (straight, "hf_model/model.safetensors"),
        (straight_adapter, "adapter/adapter_model.safetensors"),
    ):
        resumed = load_file(run / after)
        assert before.keys() == resumed.keys()
        assert all(torch.equal(before[name], resumed[name]) for name in before), after
    again = json.loads((run / "report.json").read_text())
    assert again["after"] == report["after"] and again["drift"] == report["drift"]
    assert {path.name: digest(path) for path in model_dir.iterdir() if path.is_file()} == base_files

    plan = json.loads((run / "plan.json").read_text())["params"]
    trained = {name for name, rule in plan.items() if rule["mode"] != "frozen"}
    assert trained and all(".lora_A.default." in n or ".lora_B.default." in n for n in trained), trained
    modes = {rule["mode"] for name, rule in plan.items() if name in trained}
    assert modes == {"topk" if "mofo" in method else "dense"}, modes  # lora+mofo: MoFO on the adapters

    base = base_weights(lab_cache, monkeypatch)
    exported = AutoModelForCausalLM.from_pretrained(run / "hf_model", dtype=torch.float32).state_dict()
    assert exported.keys() == base.keys()
    adapted = 0
    for name, weight in base.items():
        a_name = PREFIX + name.removesuffix(".weight") + ".lora_A.weight"
        if a_name in straight_adapter:
            adapted += 1
            b = straight_adapter[a_name.replace(".lora_A.", ".lora_B.")]
            torch.testing.assert_close(exported[name], weight + SCALE * b @ straight_adapter[a_name])
            assert not torch.equal(exported[name], weight), name
        else:
            assert torch.equal(exported[name], weight), name
    assert adapted == 14  # all-linear: 7 matrices in each of the 2 layers, not lm_head
    drift = report["drift"]  # merged weights against the base, by the base names
    assert drift["embedding"]["changed_fraction"] == 0 and drift["norm"]["changed_fraction"] == 0
    # B·A changes row i of W where row i of B is nonzero: every row under AdamW; MoFO's filter
    # leaves some rows of B at 0 after 4 steps
    changed = drift["attention"]["changed_fraction"]
    assert changed == 1.0 if method == "lora" else 0 < changed < 1, changed

    tokens = torch.randint(0, exported["model.embed_tokens.weight"].shape[0], (2, 12))
    merged = AutoModelForCausalLM.from_pretrained(run / "hf_model", dtype=torch.float32).eval()
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), run / "adapter"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(tokens).logits, merged(tokens).logits, rtol=1e-5, atol=1e-5)


def test_compare_puts_lora_beside_full(compared) -> None:
    """compare.py takes lora like any method: a row each, and lora's optimizer state is that of
    its adapters (a small share of full fine-tuning's). (conftest's `compared` runs lora with
    {"rank": 4} beside full and the other compare tests' methods.)"""
    tmp_path, done = compared.output, compared.done
    assert compared.row_names(("full", "lora")) == {"full", "lora"}, done.stdout[-3000:]
    reports = json.loads((tmp_path / "compare.json").read_text())
    memory = {m: reports[m]["train"]["optimizer_state_mib_per_rank"] for m in reports}
    assert memory["lora"] < 0.2 * memory["full"], memory
    assert 0 < reports["lora"]["trainable_share"] < 0.2, reports["lora"]["trainable_share"]
