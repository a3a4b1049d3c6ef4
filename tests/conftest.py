"""Shared fixtures: each lab preset built once per test session, and copies of it where tests
need a cache of their own; the session's cache, where every test process can read it."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Nothing downloads in a test: the Hugging Face libraries read these once, when first imported
# (dsforget.eval.general_tasks refuses to run otherwise); the ranks tests start inherit them.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# No test writes into the user's cache (~/.cache/dsforget, or their own DSFORGET_CACHE): a test
# (or a job it starts) that names no cache of its own gets this session's, removed at exit.
_SESSION_CACHE = tempfile.mkdtemp(prefix="dsforget-test-cache-")
os.environ["DSFORGET_CACHE"] = _SESSION_CACHE
atexit.register(shutil.rmtree, _SESSION_CACHE, True)


@pytest.fixture(scope="session")
def copy_lab(tmp_path_factory) -> Callable:
    """``copy_lab(preset, cache_root)``: the preset's lab (a ``LabArtifacts``) in ``cache_root``,
    copied from one build per session instead of built again (a build pretrains a model).

    Each preset is built on first use into a directory no test is given, by ``python -m
    dsforget.lab`` in a child process with one thread, as every job's ranks build it (in the
    test process, two threads on a shared 2-core machine made a build several times slower).
    Tests that write into a lab (lm-eval task folders) write into their own copy."""
    from dsforget.lab import LabConfig, build_lab, lab_dir

    built = tmp_path_factory.mktemp("built_labs")

    def copy(preset: str, cache_root: Path):
        config = LabConfig.preset(preset)
        source = lab_dir(config, built)
        if not source.is_dir():
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            command = [sys.executable, "-m", "dsforget.lab", "--preset", preset, "--cache-root", str(built)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"building the {preset} lab failed:\n{done.stderr[-3000:]}"
        shutil.copytree(source, lab_dir(config, cache_root))
        return build_lab(config, cache_root)  # found in the cache, not built

    return copy


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the Triton-interpreter cases (parameter ids that begin "triton-interpret") in a
    process without TRITON_INTERPRET=1: Triton reads it when kernels are decorated, so they run
    only in the subprocess of tests/kernels/test_triton.py, which sets it. Deselected, not
    skipped: they run. (A substring match once deselected a DeepSpeed run named
    "zero2-triton-interpreted", which sets the interpreter for its own ranks: it never ran.)"""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    interpreted = [item for item in items if "[triton-interpret" in item.nodeid]
    if interpreted:
        config.hook.pytest_deselected(items=interpreted)
        items[:] = [item for item in items if "[triton-interpret" not in item.nodeid]


@pytest.fixture(scope="session")
def lab_cache(tmp_path_factory, copy_lab) -> Path:
    """DSFORGET_CACHE for the session, holding the tiny lab (and only it: test_multinode compares
    its labs with a node's own build)."""
    cache = tmp_path_factory.mktemp("dsforget_cache")
    copy_lab("tiny", cache / "lab")
    return cache


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A Hugging Face checkpoint directory with a tokenizer, small enough to load in a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsforget.lab.tokenizer import train_tokenizer

    directory = tmp_path_factory.mktemp("tiny_model")
    tokenizer = train_tokenizer(["the cat sat on the mat", "a dog ran far away"] * 10, 300, 64)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
