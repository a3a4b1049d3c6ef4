"""dsforget.lab: a seeded corpus, a cached base model built once per config, and its metrics.

The "tiny" preset is built once per test session into a temporary cache, by two processes at
once, as two ranks would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import dsforget.lab.build
import dsforget.lab.config
from dsforget.data import IGNORE_INDEX, DataConfig, prepare_data, render_prompt, to_conversation
from dsforget.lab import (
    LabConfig,
    build_lab,
    chance_recall,
    fact_recall,
    lab_dir,
    perplexity,
    task_exact_match,
)
from dsforget.lab.build import chat_document
from dsforget.lab.corpus import generate_corpus
from dsforget.lab.skills import CODE_WORDS, TASK_WORDS, TRANSFORMS

TINY = LabConfig.preset("tiny")

BUILD_IN_SUBPROCESS = textwrap.dedent(
    """
    import sys
    from dsforget.lab import LabConfig, build_lab
    print(build_lab(LabConfig.preset("tiny"), cache_root=sys.argv[1]).root)
    """
)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("lab_cache")


@pytest.fixture(scope="module")
def tiny_lab(cache_root):
    """Two processes build the same lab at once, as ranks do; both must get one finished build.
    One thread each, as a job's ranks run (two threads each made the build several times slower
    on a shared 2-core machine)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_IN_SUBPROCESS, str(cache_root)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    # The last line: importing dsforget may print library banners first.
    roots = [rank.communicate(timeout=300)[0].strip().splitlines()[-1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0]
    artifacts = build_lab(TINY, cache_root=cache_root)
    assert roots == [str(artifacts.root)] * 2
    return artifacts


@pytest.fixture(scope="module")
def tiny_model(tiny_lab):
    """Loaded the way a user loads any checkpoint, which is the point of caching it as one."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lab.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lab.tokenizer_dir)
    return model, tokenizer


def test_corpus_is_a_function_of_the_seed():
    assert generate_corpus(TINY) == generate_corpus(TINY)
    other = generate_corpus(dataclasses.replace(TINY, seed=1))
    assert other.facts != generate_corpus(TINY).facts


def test_corpus_task_splits_are_disjoint_and_facts_unambiguous():
    corpus = generate_corpus(TINY)
    assert (
        len(corpus.task_train) == TINY.task_train_examples
        and len(corpus.task_eval) == TINY.task_eval_examples
    )
    assert {e["input"] for e in corpus.task_train}.isdisjoint(e["input"] for e in corpus.task_eval)
    assert all(e["output"].split() == e["input"].split()[::-1] for e in corpus.task_eval)
    prompts = [fact.prompt for fact in corpus.facts]
    assert len(prompts) == len(set(prompts)), "two facts with one prompt cannot both be recalled"
    assert not any(fact.prompt in text for fact in corpus.facts for text in corpus.heldout_documents)


def test_concurrent_builds_build_once(tiny_lab, cache_root):
    """Catches a half-written build left behind (ranks racing into one directory fail the fixture)."""
    name = tiny_lab.root.name
    assert sorted(path.name for path in cache_root.iterdir() if name in path.name) == [name, f"{name}.lock"]
    for path in [tiny_lab.task_train, tiny_lab.task_eval, tiny_lab.general_heldout, tiny_lab.facts]:
        assert path.stat().st_size > 0
    assert (tiny_lab.model_dir / "model.safetensors").is_file()


def test_cache_hit_does_not_rebuild(tiny_lab, cache_root, monkeypatch):
    weights = tiny_lab.model_dir / "model.safetensors"
    modified = weights.stat().st_mtime_ns

    def fail(*args):
        raise AssertionError("rebuilt a lab that is in the cache")

    monkeypatch.setattr(dsforget.lab.build, "_build", fail)
    assert build_lab(TINY, cache_root=cache_root) == tiny_lab
    assert weights.stat().st_mtime_ns == modified


def test_failed_build_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    """Catches a crash mid-build leaving a directory that the next call would take as built."""

    def crash(config, root):
        (root / "half_written").write_text("")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(dsforget.lab.build, "_build", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        build_lab(TINY, cache_root=tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == [f"{lab_dir(TINY, tmp_path).name}.lock"]


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DSFORGET_CACHE", str(tmp_path))
    assert lab_dir(TINY).parent == tmp_path / "lab"
    monkeypatch.delenv("DSFORGET_CACHE")
    assert lab_dir(TINY).parent == Path.home() / ".cache" / "dsforget" / "lab"


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"name": "tiny2"},
        {"hidden_size": 128},
        {"learning_rate": 1e-3},
        {"task_max_words": 5},
        {"task": "sort"},
        {"skills": ("sort",), "skill_examples": 1, "skill_eval_examples": 1},
    ],
)
def test_config_changes_change_the_cache_directory(tmp_path, change):
    """Catches a field left out of the cache key, which would serve stale artifacts."""
    assert lab_dir(dataclasses.replace(TINY, **change), tmp_path) != lab_dir(TINY, tmp_path)


def test_code_format_version_is_part_of_the_cache_key(tmp_path, monkeypatch):
    before = lab_dir(TINY, tmp_path)
    monkeypatch.setattr(dsforget.lab.config, "LAB_FORMAT_VERSION", dsforget.lab.config.LAB_FORMAT_VERSION + 1)
    assert lab_dir(TINY, tmp_path) != before


def test_changed_config_builds_its_own_directory(tiny_lab, tmp_path):
    quick = dataclasses.replace(TINY, seed=5, pretrain_steps=2, warmup_steps=1)
    other = build_lab(quick, cache_root=tmp_path)
    assert other.root.name != tiny_lab.root.name and other.root.is_dir()
    assert other.load_facts() != tiny_lab.load_facts()


def test_base_model_recalls_facts_and_cannot_do_the_task(tiny_lab, tiny_model):
    """The lab is only an experiment if there is knowledge to forget and a task to gain."""
    model, tokenizer = tiny_model
    facts = tiny_lab.load_facts()
    recall = fact_recall(model, tokenizer, facts)
    assert recall > max(0.6, 3 * chance_recall(facts)), recall
    assert perplexity(model, tokenizer, tiny_lab.load_heldout_texts()) < 8  # uniform guessing: ~500
    assert task_exact_match(model, tokenizer, tiny_lab.load_task_eval()) < 0.1
    info = json.loads(tiny_lab.build_info.read_text())
    assert info["base_fact_recall"] == recall and info["parameters"] == model.num_parameters()


def test_task_exact_match_batches_like_one_prompt_at_a_time(tiny_lab, tiny_model):
    """Catches left-padding mistakes: batched greedy answers must equal one-at-a-time answers."""
    model, tokenizer = tiny_model
    # Prompts from 1 to 24 words: up to 23 padding tokens, enough to change answers if attended to.
    records = [
        {"instruction": TRANSFORMS["reverse"][0], "input": " ".join(TASK_WORDS[:n])} for n in (1, 4, 12, 24)
    ]
    answered = []
    for record in records:
        prompt = render_prompt(tokenizer, to_conversation({**record, "output": "?"}, "test")[:-1])
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        generated = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
        answered.append({**record, "output": tokenizer.decode(generated, skip_special_tokens=True)})
    assert task_exact_match(model, tokenizer, answered, batch_size=4, max_new_tokens=6) == 1.0


def test_metrics_restore_training_mode(tiny_lab, tiny_model):
    model, tokenizer = tiny_model
    model.train()
    fact_recall(model, tokenizer, tiny_lab.load_facts()[:4])
    perplexity(model, tokenizer, tiny_lab.load_heldout_texts()[:2])
    task_exact_match(model, tokenizer, tiny_lab.load_task_eval()[:2])
    assert model.training
    model.eval()


def test_task_files_flow_through_the_data_pipeline(tiny_lab, tiny_model):
    """The lab is handled like a real checkpoint: chat template, masked prompt, eos-terminated answer."""
    _, tokenizer = tiny_model
    example = prepare_data(DataConfig(str(tiny_lab.task_train)), tokenizer).train[0]
    record = json.loads(tiny_lab.task_train.read_text().splitlines()[0])
    trained = [
        token
        for token, label in zip(example["input_ids"], example["labels"], strict=True)
        if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(trained) == record["output"] + tokenizer.eos_token


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"hidden_size": 65}, "LabConfig.hidden_size"),
        ({"num_kv_heads": 3}, "LabConfig.num_heads"),
        ({"vocab_size": 100}, "LabConfig.vocab_size"),
        ({"pretrain_steps": 0}, "LabConfig.pretrain_steps"),
        ({"learning_rate": 0.0}, "LabConfig.learning_rate"),
        ({"name": "a/b"}, "LabConfig.name"),
        ({"task_min_words": 5}, "LabConfig.task_min_words"),
        ({"task": "shuffle"}, "unknown task or skill 'shuffle'"),
        ({"skills": ("sort", "zip"), "skill_examples": 1, "skill_eval_examples": 1}, "'zip'"),
        (
            {"skills": ("reverse",), "skill_examples": 1, "skill_eval_examples": 1},
            "must not include the task",
        ),
        ({"skills": ("sort",)}, "skill_examples >= 1"),
        ({"skill_examples": -1}, "LabConfig.skill_examples"),
    ],
)
def test_lab_config_errors_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        LabConfig.preset("tiny", **overrides)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"\['default', 'plain', 'tiny', 'tiny_aligned'\]"):
        LabConfig.preset("huge")


def test_code_words_are_a_permutation_without_fixed_points():
    assert sorted(CODE_WORDS.values()) == sorted(TASK_WORDS)
    assert all(word != code for word, code in CODE_WORDS.items())
    assert TRANSFORMS["encode"][1](["red", "cat"]) == [CODE_WORDS["red"], CODE_WORDS["cat"]]


def test_aligned_corpus_holds_out_every_skill_list_and_asks_every_fact():
    """Versatility is scored on lists no skill was pretrained on, and the task stays unseen."""
    config = LabConfig.preset("tiny_aligned")
    corpus = generate_corpus(config)
    pretrained = {(r["instruction"], r.get("input")) for r in corpus.chat_examples}
    assert corpus.skill_eval and not pretrained & {(r["instruction"], r["input"]) for r in corpus.skill_eval}
    assert {r["instruction"] for r in corpus.skill_eval} == {TRANSFORMS[s][0] for s in config.skills}
    assert TRANSFORMS[config.task][0] not in {r["instruction"] for r in corpus.chat_examples}
    questions = [r for r in corpus.chat_examples if "input" not in r]
    assert len(questions) == len(corpus.facts) * config.fact_question_repeats
    assert {q["output"] for q in questions} == {f.answer.strip() for f in corpus.facts}
    assert generate_corpus(LabConfig.preset("tiny")).chat_examples == []


def test_chat_documents_are_what_fine_tuning_renders(tiny_model):
    """Pretraining sees a chat example exactly as the data pipeline renders it (bos and eos are
    added around every pretraining document), so the aligned base knows the template."""
    _, tokenizer = tiny_model
    record = {"instruction": "Sort the words alphabetically.", "input": "red cat", "output": "cat red"}
    document = chat_document(tokenizer, record)
    rendered = tokenizer.apply_chat_template(to_conversation(record, "test"), tokenize=False)
    assert rendered == tokenizer.bos_token + document + tokenizer.eos_token
    assert document.startswith("<|user|>") and document.endswith("<|assistant|>cat red")


def test_aligned_base_does_its_skills_and_not_the_task(tmp_path, copy_lab):
    """The aligned lab's base model answers its chat skills on held-out lists and cannot encode
    (the session's build of it, which build_lab made as it makes every lab)."""
    lab = copy_lab("tiny_aligned", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(lab.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(lab.tokenizer_dir)
    skills = task_exact_match(model, tokenizer, lab.load_skill_eval())
    info = json.loads(lab.build_info.read_text())
    assert info["base_skill_exact_match"] == skills
    assert skills > 0.5, skills
    assert task_exact_match(model, tokenizer, lab.load_task_eval()) < 0.1


def test_tests_never_write_into_the_users_cache():
    """tests/conftest.py gives the session a cache of its own: a test or job that names no cache
    writes there, not into ~/.cache/dsforget or a DSFORGET_CACHE the user set."""
    from dsforget.data_cache import cache_root

    root = cache_root().resolve()
    assert root.is_relative_to(Path(tempfile.gettempdir()).resolve()), root
    assert not root.is_relative_to((Path.home() / ".cache").resolve()), root
