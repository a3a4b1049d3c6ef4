"""lm-evaluation-harness on the lab's tasks, offline, in one process: the same numbers as
dsforget's own scorers on the same records and model."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsforget.data import render_prompt, to_conversation
from dsforget.eval.general_tasks import load_general_tasks, score_general_tasks
from dsforget.lab import fact_recall, task_exact_match
from dsforget.lab.lm_eval_tasks import LAB_TASKS, lab_task_dir, write_exact_match_task

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory) -> Path:
    """This module's own lab cache: the lm-eval task folders it writes into a lab, and the aligned
    lab, must not appear in the session's cache, which other tests copy and compare."""
    return tmp_path_factory.mktemp("lab")


@pytest.fixture(scope="module")
def lab(lab_root, copy_lab):
    return copy_lab("tiny", lab_root)


@pytest.fixture(scope="module")
def noisy_model(lab):
    """The tiny lab's base model with seeded noise on its weights: it recalls about half of the
    facts (0.43), so recall equality is not 1.0 == 1.0."""
    model = AutoModelForCausalLM.from_pretrained(lab.model_dir).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.7 * parameter.std())
    return model


@pytest.fixture(scope="module")
def tokenizer(lab):
    return AutoTokenizer.from_pretrained(lab.model_dir)


def half_answered(model, tokenizer, records: list[dict]) -> list[dict]:
    """`records` whose even ones take the model's own greedy answer (NEW_TOKENS tokens) as the
    reference: a model that answers none of the real task still scores 0.5 on these, exactly
    when both scorers generate, decode and compare alike."""
    changed = []
    for index, record in enumerate(records):
        if index % 2 == 0:
            prompt = render_prompt(tokenizer, to_conversation(record, "record")[:-1])
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = model.generate(
                ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            record = {**record, "output": tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)}
        changed.append(record)
    return changed


def test_lm_eval_scores_equal_dsforgets_own_on_the_same_records(
    lab, noisy_model, tokenizer, tmp_path: Path
) -> None:
    """The lm-eval path (task YAML on local JSONL, HFLM around the model, no network) must give
    task_exact_match's and fact_recall's numbers on the same records: catches a prompt rendered
    or tokenised differently (a doubled BOS, a missing chat template), a different new-token budget,
    whitespace compared differently, and a continuation scored from the wrong position."""
    records = half_answered(noisy_model, tokenizer, lab.load_task_eval()[:16])
    write_exact_match_task("em_check", records, tokenizer, tmp_path, max_new_tokens=NEW_TOKENS)
    tasks = load_general_tasks(["em_check", "lab_fact_recall", "lab_heldout"], [tmp_path, lab_task_dir(lab)])
    assert tasks.names == ["em_check", "lab_fact_recall", "lab_heldout"]

    start = time.perf_counter()
    scores = score_general_tasks(noisy_model, tokenizer, tasks)
    print(f"lm-eval scoring on the tiny lab: {time.perf_counter() - start:.1f} s")

    own = task_exact_match(noisy_model, tokenizer, records, max_new_tokens=NEW_TOKENS)
    assert own >= 0.5  # the even half at least: the comparison is not 0 == 0
    assert scores["lm_eval/em_check/exact_match"] == own
    recall = fact_recall(noisy_model, tokenizer, lab.load_facts())
    assert 0.2 < recall < 0.8, recall
    assert scores["lm_eval/lab_fact_recall/acc"] == recall
    assert scores["lm_eval/lab_heldout/word_perplexity"] > scores["lm_eval/lab_heldout/byte_perplexity"] > 1


def test_lab_tasks_are_written_once_and_load_offline(lab) -> None:
    """Every rank asks for the lab's task folder at once: the second call must reuse the first's
    files (catches a rewrite racing a reader), and the three tasks load from local files only."""
    first = lab_task_dir(lab)
    stamp = (first / "lab_task.yaml").stat().st_mtime_ns
    assert lab_task_dir(lab) == first
    assert (first / "lab_task.yaml").stat().st_mtime_ns == stamp
    tasks = load_general_tasks(LAB_TASKS, [first], limit=5)
    assert tasks.names == list(LAB_TASKS)
    assert tasks.smallest[1] == 5


def test_aligned_labs_skills_task_equals_skill_exact_match(lab, lab_root, copy_lab) -> None:
    """An aligned lab's held-out chat skills are an lm-eval task too, scored as the job scores
    them; a lab without skills has no such task file."""
    aligned = copy_lab("tiny_aligned", lab_root)
    model = AutoModelForCausalLM.from_pretrained(aligned.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(aligned.model_dir)
    tasks = load_general_tasks(["lab_skills"], [lab_task_dir(aligned)])
    own = task_exact_match(model, tokenizer, aligned.load_skill_eval())
    assert own > 0.5, own  # the base does its skills: the comparison is not 0 == 0
    assert score_general_tasks(model, tokenizer, tasks)["lm_eval/lab_skills/exact_match"] == own
    assert not (lab_task_dir(lab) / "lab_skills.yaml").exists()  # the tiny lab has no skills
