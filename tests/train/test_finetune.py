"""The main job end to end: 2 CPU ranks, ZeRO-3, the tiny lab."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launcher import REPO, RankFailure, run_ranks
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.distributed

FINETUNE = str(REPO / "launch" / "finetune.py")
TINY_RUN = [
    "--lab_preset",
    "tiny",
    "--micro_batch_size",
    "8",
    "--log_every",
    "5",
    "--eval_max_examples",
    "50",
]


def finetune(output: Path, lab_cache: Path, *args: str, timeout: float = 600) -> list[str]:
    return run_ranks(
        [FINETUNE, *TINY_RUN, "--output_dir", str(output), *args],
        world_size=2,
        timeout=timeout,
        env={"DSFORGET_CACHE": str(lab_cache)},
    )


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lab_cache: Path) -> Path:
    output = tmp_path_factory.mktemp("run")
    # tiny's task needs a few hundred MoFO steps at this rate (0.44 exact match after 300 steps)
    finetune(
        output,
        lab_cache,
        "--max_steps",
        "240",
        "--lr",
        "2e-3",
        "--fraction",
        "0.5",
        "--lr_schedule",
        "constant",
        "--log_every",
        "20",
        "--eval_every",
        "80",
    )
    return output


def test_loss_falls_task_rises_and_report_holds_numbers(trained: Path) -> None:
    """Catches a job that trains nothing (loss flat), evaluates the wrong model (no task gain),
    or writes a report with placeholders instead of measured numbers."""
    losses = [m["loss"] for m in metrics(trained) if "loss" in m]
    assert losses[-1] < 0.7 * losses[0], losses
    report = json.loads((trained / "report.json").read_text())
    assert report["after"]["task_exact_match"] > report["before"]["task_exact_match"]
    assert report["summary"]["task_gain"] > 0
    for value in [
        *report["before"].values(),
        *report["after"].values(),
        report["drift"]["all"]["relative_l2"],
    ]:
        assert isinstance(value, float) and math.isfinite(value)
    assert 0 < report["drift"]["all"]["changed_fraction"] < 1
    assert report["train"]["steps"] == 240 and report["train"]["world_size"] == 2
    for name in (
        "config.json",
        "plan.json",
        "report.png",
        "hf_model/config.json",
        "hf_model/model.safetensors",
    ):
        assert (trained / name).exists(), name
    assert list((trained / "tensorboard").iterdir())


def test_scores_along_training_at_each_eval_step_and_once_at_the_end(trained: Path) -> None:
    """--eval_every 80 of 240 steps: the evaluation metrics at steps 80 and 160 and once at the
    end, whose scores are the report's "after"; the report's trajectory starts at the base."""
    scored = [m for m in metrics(trained) if "task_exact_match" in m]
    assert [m["step"] for m in scored] == [80, 160, 240]
    assert all({"fact_recall", "general_perplexity"} <= m.keys() for m in scored)
    report = json.loads((trained / "report.json").read_text())
    assert [p["step"] for p in report["trajectory"]] == [0, 80, 160, 240]
    assert report["trajectory"][0] == {"step": 0, **report["before"]}
    assert report["trajectory"][-1] == {"step": 240, **report["after"]}


def test_exported_checkpoint_reproduces_the_trained_weights(trained: Path) -> None:
    """The safetensors export must hold the ZeRO-3 partitions gathered in the right order: its
    logits equal those of DeepSpeed's own fp32 consolidation of the final checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    exported = AutoModelForCausalLM.from_pretrained(trained / "hf_model", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(trained / "hf_model", dtype=torch.float32).eval()
    final = sorted((trained / "checkpoints").glob("step*"))[-1]
    reference.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(final.parent), tag=final.name))
    tokens = torch.randint(0, exported.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, reference(tokens).logits, rtol=0, atol=0)


def test_resume_continues_exactly(tmp_path: Path, lab_cache: Path) -> None:
    """Stopping after step 6 and rerunning with the same output_dir must give the losses and
    final weights of one uninterrupted 12-step run (data position, RNG, moments, step count)."""
    common = ["--lr_schedule", "constant", "--warmup_steps", "0", "--log_every", "1", "--no-export"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    finetune(straight, lab_cache, "--max_steps", "12", *common)
    finetune(split, lab_cache, "--max_steps", "6", *common)
    finetune(split, lab_cache, "--max_steps", "12", *common)
    straight_losses = [m["loss"] for m in metrics(straight) if "loss" in m]
    split_losses = [m["loss"] for m in metrics(split) if "loss" in m]
    assert split_losses == straight_losses
    a = json.loads((straight / "report.json").read_text())
    b = json.loads((split / "report.json").read_text())
    assert a["after"] == b["after"] and a["drift"] == b["drift"]


RESUMABLE = [
    *("--lr_schedule", "constant", "--warmup_steps", "0", "--log_every", "1", "--save_every", "2"),
    "--no-export",
]


@pytest.fixture(scope="module")
def resumed_with_new_lr(tmp_path_factory, lab_cache: Path) -> tuple[Path, str]:
    """A run of 4 steps at lr 1e-3, resumed to 6 steps with lr 5e-4 and weight decay 0.1: the
    output_dir and the resumed run's rank-0 output."""
    output = tmp_path_factory.mktemp("new_lr")
    finetune(output, lab_cache, "--max_steps", "4", "--lr", "1e-3", *RESUMABLE)
    outputs = finetune(output, lab_cache, *RESUMED_FLAGS, *RESUMABLE)
    return output, outputs[0]


RESUMED_FLAGS = ["--max_steps", "6", "--lr", "5e-4", "--weight_decay", "0.1"]


def test_resume_with_a_new_lr_trains_and_logs_the_new_one(resumed_with_new_lr: tuple[Path, str]) -> None:
    """Catches a changed --lr / --weight_decay ignored on resume: DeepSpeed's load_checkpoint puts
    back the saved param groups and the schedule's base lr, so before issue 15 steps 5 and 6 still
    trained (and logged) lr 1e-3, and nothing said so."""
    output, log = resumed_with_new_lr
    lrs = {m["step"]: m["lr"] for m in metrics(output) if "lr" in m}
    assert lrs == {1: 1e-3, 2: 1e-3, 3: 1e-3, 4: 1e-3, 5: 5e-4, 6: 5e-4}, lrs  # constant schedule: factor 1
    assert "this run's settings replace the checkpoint's: lr 0.001 -> 0.0005, weight_decay 0.0 -> 0.1" in log


def test_rerun_of_a_finished_run_says_so_and_keeps_its_report(
    resumed_with_new_lr: tuple[Path, str], lab_cache: Path
) -> None:
    """The same command again into the finished run's output_dir. Catches a rerun that resumes
    at the last step, trains nothing and rewrites report.json with ``nan`` step times (before
    issue 15: bare NaN in report.json, 'nan ms/step'), and any NaN/Infinity in report.json."""
    output, _ = resumed_with_new_lr
    report, lines = (output / "report.json").read_bytes(), (output / "metrics.jsonl").read_bytes()

    def refuse(constant: str) -> None:
        raise ValueError(f"report.json holds {constant}")

    assert json.loads(report, parse_constant=refuse)["train"]["steps"] == 6
    log = finetune(output, lab_cache, *RESUMED_FLAGS, *RESUMABLE)[0]
    assert "finished at step 6 (this run's end: step 6); nothing to train" in log and "--resume never" in log
    assert "nan ms/step" not in log
    assert (output / "report.json").read_bytes() == report
    assert (output / "metrics.jsonl").read_bytes() == lines


def test_bad_data_line_is_named(tmp_path: Path, lab_cache: Path) -> None:
    data = tmp_path / "broken.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    with pytest.raises(RankFailure) as failure:
        finetune(tmp_path / "out", lab_cache, "--data", str(data), timeout=300)
    assert f"{data}:2" in failure.value.outputs[0]


def test_compare_runs_each_method_and_tabulates(compared) -> None:
    """The comparison command must run every method on the same data and tabulate measured values.
    (conftest's `compared`: full, mofo at two rates and hft with two plan seeds, 6 steps each with
    --eval_every 3, beside the runs the baselines' and lora's compare tests read.)"""
    tmp_path, command, env, done = compared.output, compared.command, compared.env, compared.done
    runs = ("full", "mofo@0.001", "mofo@0.002", "hft/seed0", "hft/seed1")
    rows = {
        line.split()[0]: line.split()[1:]
        for line in done.stdout.splitlines()
        if line.startswith(tuple(f"{run} " for run in runs))
    }
    assert set(rows) == set(runs) and all(len(cells) == 8 for cells in rows.values())  # 8 columns
    reports = json.loads((tmp_path / "compare.json").read_text())
    assert (
        reports["mofo@0.002"]["train"]["steps"] == 6 and (tmp_path / "mofo-lr0.002" / "report.json").exists()
    )
    configs = [json.loads((tmp_path / f"hft-seed{seed}" / "config.json").read_text()) for seed in (0, 1)]
    assert [config["method_options"]["seed"] for config in configs] == [0, 1]
    assert reports["hft/seed0"]["plan_digest"] != reports["hft/seed1"]["plan_digest"]  # two draws
    for report in reports.values():  # --eval_every 3 of 6 steps: the base, step 3 and the end
        assert [point["step"] for point in report["trajectory"]] == [0, 3, 6]
    matched = json.loads((tmp_path / "matched.json").read_text())
    assert (
        matched["task_metric"] == "task_exact_match" and {"levels", "tuned", "seed_spread"} <= matched.keys()
    )
    assert "at matched task_exact_match" in done.stdout or "no task level" in done.stdout
    assert reports["full"]["plan_digest"] != reports["mofo@0.001"]["plan_digest"]
    assert (
        reports["mofo@0.001"]["drift"]["all"]["changed_fraction"]
        < reports["full"]["drift"]["all"]["changed_fraction"]
    )
    # HFT's frozen half has no master copy and no Adam state: optimizer memory falls with it
    memory = {m: reports[m]["train"]["optimizer_state_mib_per_rank"] for m in reports}
    assert memory["hft/seed0"] < 0.75 * memory["full"], memory
    assert reports["hft/seed0"]["trainable_share"] < 0.75
    assert (tmp_path / "compare.png").exists()

    # Again: every run is finished with these settings, so each is reused and said to be.
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for run, folder in (("full", "full"), ("mofo@0.001", "mofo-lr0.001"), ("hft/seed1", "hft-seed1")):
        assert f"== {run}: reusing the finished run in {tmp_path / folder} (same settings)" in again.stdout
    assert json.loads((tmp_path / "compare.json").read_text()) == reports
    # Other settings: refused before anything runs, naming the key (before issue 15 the runs
    # resumed at their last step and the table showed the old numbers as the new ones).
    other = subprocess.run([*command, "--lr", "5e-4"], env=env, capture_output=True, text=True, timeout=600)
    assert other.returncode != 0
    assert f"{tmp_path / 'full'} holds a run made with other settings (lr=0.001 there, 0.0005 here)" in (
        other.stderr
    )


def test_cofitune_measures_importance_in_the_job_and_scales_rows(tmp_path: Path, lab_cache: Path) -> None:
    """CoFiTune's fine level end to end under ZeRO-3: the job must compute importance on general
    data before the engine exists, keep it as an artifact, turn it into row scales of exactly the
    coarse level's matrices, and leave every other parameter bit-identical to the base."""
    from dsforget.lab import LabConfig, build_lab
    from dsforget.methods.cofitune.importance import UnitImportance

    options = json.dumps({"layers": "top-plus", "modules": "ffn"})
    finetune(
        tmp_path, lab_cache, "--method", "cofitune", "--method_options", options,
        "--max_steps", "4", "--importance_batches", "1",
    )  # fmt: skip
    importance = UnitImportance.load(tmp_path / "importance.safetensors")
    assert importance.meta["source"] == "lab pretraining corpus" and importance.meta["world_size"] == 2
    plan = json.loads((tmp_path / "plan.json").read_text())["params"]
    trained = {name for name, rule in plan.items() if rule["mode"] != "frozen"}
    assert trained == {"model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    up = torch.tensor(plan["model.layers.1.mlp.up_proj.weight"]["row_scale"])
    torch.testing.assert_close(up, 1 - importance.intermediate[1])
    lab = build_lab(LabConfig.preset("tiny"), lab_cache / "lab")  # already built: read from the cache
    base = AutoModelForCausalLM.from_pretrained(lab.model_dir).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_model").state_dict()
    for name, tensor in base.items():
        assert torch.equal(tensor, tuned[name]) == (name not in trained), name


def test_hft_resampling_trains_each_draws_half_in_turn(tmp_path: Path, lab_cache: Path) -> None:
    """HFT with resample_every: every member matrix stays in the optimizer and each draw trains
    its own half. Catches draws that differ between ranks (the run would fail its plan check),
    draws that never switch (only the first half would move) and held matrices that still move."""
    from dsforget.lab import LabConfig, build_lab
    from dsforget.methods.resampling import Resampler

    finetune(
        tmp_path, lab_cache, "--method", "hft", "--resample_every", "3", "--max_steps", "6", "--seed", "4"
    )
    lab = build_lab(LabConfig.preset("tiny"), lab_cache / "lab")
    base_model = AutoModelForCausalLM.from_pretrained(lab.model_dir)
    resampler = Resampler(base_model, "hft", {"seed": 4}, {}, every_steps=3)
    membership = json.loads((tmp_path / "plan.json").read_text())["params"]
    assert all(rule["mode"] == "dense" for rule in membership.values())
    drawn = [resampler.plan_of_draw(draw) for draw in (0, 1)]
    assert drawn[0].digest != drawn[1].digest
    union = {name for plan in drawn for name, rule in plan.rules.items() if rule.trains}
    base = base_model.state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_model").state_dict()
    moved = {name for name, tensor in base.items() if not torch.equal(tensor, tuned[name])}
    assert moved == union & set(base), sorted(moved ^ union)


def test_torchrun_runs_the_job(tmp_path: Path, lab_cache: Path) -> None:
    """The job under torchrun (RANK/WORLD_SIZE from torch's elastic launcher, no DeepSpeed
    launcher): catches rank discovery that only understands the deepspeed launcher or MPI."""
    from launcher import free_port

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "DSFORGET_CACHE": str(lab_cache)}
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), FINETUNE, *TINY_RUN]
    command += ["--max_steps", "3", "--no-export", "--output_dir", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["train"]["world_size"] == 2 and report["train"]["steps"] == 3


def test_packed_checkpointed_run_tokenises_once_and_refuses_another_attention(
    tmp_path: Path, lab_cache: Path
) -> None:
    """Issue 16 items 2 and 3 through the job on 2 ranks under ZeRO-3: packing, gradient
    checkpointing and eager attention train; rank 0 tokenises into --data_cache_dir and a second
    run reads the entry; config.json records the flags and the checkpoint the attention kernel,
    so resuming under sdpa is refused by name."""
    cache = tmp_path / "data-cache"
    flags = ["--packing", "--gradient_checkpointing", "--attn_implementation", "eager"]
    flags += ["--data_cache_dir", str(cache), "--no-export", "--log_every", "1"]
    first = finetune(tmp_path / "a", lab_cache, *flags, "--max_steps", "2")[0]
    assert "tokenising" in first and "attention eager, gradient checkpointing on" in first
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1 and json.loads((entries[0] / "meta.json").read_text())["packing"] is True
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["gradient_checkpointing"] is True and saved["attn_implementation"] == "eager"
    second = finetune(tmp_path / "b", lab_cache, *flags, "--max_steps", "2")[0]
    assert f"tokenised data: reusing {entries[0]}" in second
    losses = [[m["loss"] for m in metrics(tmp_path / run) if "loss" in m] for run in ("a", "b")]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    resumed = [*flags[:2], "--attn_implementation", "sdpa", *flags[4:], "--max_steps", "3"]
    with pytest.raises(RankFailure) as failure:
        finetune(tmp_path / "a", lab_cache, *resumed)
    assert "attn_implementation='eager' there, 'sdpa' here" in failure.value.outputs[0]


def test_aligned_lab_scores_versatility_along_training(tmp_path: Path, copy_lab) -> None:
    """The aligned lab's held-out chat skills are scored at the base, along training and at the
    end, and their loss is a forgetting measure of the summary and the matched comparison."""
    cache = tmp_path / "cache"  # its own: the session's cache holds the tiny lab only
    copy_lab("tiny_aligned", cache / "lab")
    output = tmp_path / "aligned"
    finetune(output, cache, "--lab_preset", "tiny_aligned", "--max_steps", "4", "--eval_every", "2")
    report = json.loads((output / "report.json").read_text())
    before, after = report["before"]["skill_exact_match"], report["after"]["skill_exact_match"]
    assert before > 0.5, before  # the base does its skills (0.95 when built)
    assert report["summary"]["skills_lost"] == pytest.approx(before - after)
    assert [p["step"] for p in report["trajectory"]] == [0, 2, 4]
    assert all("skill_exact_match" in p for p in report["trajectory"])
