"""--general_tasks in the job: lm-eval tasks scored by 2 CPU ranks under ZeRO-3, offline, before,
during and after training, equal to dsforget's own scores of the same records."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from launcher import REPO, run_ranks

from dsforget.lab import LabConfig, build_lab
from dsforget.lab.lm_eval_tasks import lab_task_dir

pytestmark = pytest.mark.distributed

FINETUNE = str(REPO / "launch" / "finetune.py")
TINY = ["--lab_preset", "tiny", "--micro_batch_size", "8", "--eval_max_examples", "50", "--no-export"]


@pytest.fixture(scope="module")
def own_cache(tmp_path_factory, copy_lab) -> Path:
    """DSFORGET_CACHE with a copy of the tiny lab: the lm-eval task folders these jobs write into
    the lab must not appear in the session's cache, nor the lab or tokenised data in ~/.cache."""
    cache = tmp_path_factory.mktemp("general_tasks_cache")
    copy_lab("tiny", cache / "lab")
    return cache


def test_lab_tasks_through_lm_eval_equal_the_jobs_own_scores_along_training(
    tmp_path: Path, own_cache: Path
) -> None:
    """Full fine-tuning at a high rate forgets facts within 10 steps, so recall moves: at the base,
    step 5 and the end, lm-eval's lab_fact_recall (documents sharded over the 2 ranks, model calls
    in lockstep under ZeRO-3) must equal the job's fact_recall, and lab_task its task_exact_match.
    Catches documents scored twice or lost between ranks, a rank hanging in a forward pass the other
    skipped, scores of the wrong model, and general tasks missing from the report or trajectory."""
    output = tmp_path / "run"
    outputs = run_ranks(
        [FINETUNE, *TINY, "--method", "full", "--lr", "3e-3", "--max_steps", "10", "--eval_every", "5"]
        + ["--general_tasks", "lab_fact_recall,lab_heldout,lab_task", "--output_dir", str(output)],
        world_size=2,
        timeout=600,
        env={"DSFORGET_CACHE": str(own_cache)},
    )
    report = json.loads((output / "report.json").read_text())
    points = report["trajectory"]
    assert [p["step"] for p in points] == [0, 5, 10]
    for point in points:
        assert point["lm_eval/lab_fact_recall/acc"] == point["fact_recall"], point
        assert point["lm_eval/lab_task/exact_match"] == point["task_exact_match"], point
        assert point["lm_eval/lab_heldout/word_perplexity"] > 1, point
    assert points[-1]["fact_recall"] < points[0]["fact_recall"]  # the equality is not 1.0 == 1.0
    general = report["general_tasks"]
    assert general["before"]["lab_fact_recall"]["acc"] == report["before"]["fact_recall"]
    assert general["after"]["lab_fact_recall"]["acc"] == report["after"]["fact_recall"]
    delta = general["delta"]["lab_heldout"]["word_perplexity"]
    assert delta == pytest.approx(
        general["after"]["lab_heldout"]["word_perplexity"]
        - general["before"]["lab_heldout"]["word_perplexity"]
    )
    assert set(report["summary"]) == {"task_gain", "fact_recall_lost", "perplexity_increase"}
    assert "fact_recall" in report["before"] and not any(k.startswith("lm_eval/") for k in report["before"])
    assert re.search(r"lab_fact_recall acc +1 +[0-9.]+ +-[0-9.]+", outputs[0]), outputs[0][-3000:]
    assert "not sharded" not in outputs[0]


def test_a_local_checkpoint_with_task_files_scores_before_and_after(tmp_path: Path, own_cache: Path) -> None:
    """The path of a real checkpoint: --model a local Hugging Face directory (the lab's base, not
    the lab), general tasks given as YAML files. One task has a single document, fewer than the
    ranks: every rank then scores every document (a WARNING says so, once) and the scores still
    equal the job's own on the same records."""
    lab = build_lab(LabConfig.preset("tiny"), own_cache / "lab")  # the copy: found, not built
    tasks = lab_task_dir(lab)
    one_fact = tmp_path / "one_fact.jsonl"
    one_fact.write_text(lab.facts.read_text().splitlines()[0] + "\n")
    single = (tasks / "lab_fact_recall.yaml").read_text().replace("lab_fact_recall", "one_fact")
    single = single.replace(str(lab.facts.resolve()), str(one_fact))
    (tmp_path / "one_fact.yaml").write_text(single)
    output = tmp_path / "run"
    outputs = run_ranks(
        [
            FINETUNE,
            "--model",
            str(lab.model_dir),
            "--data",
            str(lab.task_train),
            "--eval_data",
            str(lab.task_eval),
        ]
        + ["--micro_batch_size", "8", "--eval_max_examples", "50", "--no-export", "--max_steps", "4"]
        + ["--general_tasks", f"{tasks / 'lab_task.yaml'},{tmp_path / 'one_fact.yaml'}"]
        + ["--output_dir", str(output)],
        world_size=2,
        timeout=600,
        env={"DSFORGET_CACHE": str(own_cache)},  # its data cache too, not the user's
    )
    report = json.loads((output / "report.json").read_text())
    general = report["general_tasks"]
    assert set(general["before"]) == set(general["after"]) == {"lab_task", "one_fact"}
    assert general["before"]["one_fact"]["acc"] == 1.0  # the base recalls its facts
    for when in ("before", "after"):
        assert general[when]["lab_task"]["exact_match"] == report[when]["task_exact_match"]
    warning = (
        r"general task one_fact has 1 documents, fewer than the 2 ranks: every rank scores every document"
    )
    assert len(re.findall(warning, "\n".join(outputs))) == 1, outputs[0][-3000:]
