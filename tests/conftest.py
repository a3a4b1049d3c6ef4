"""Shared fixtures: one tiny lab per test session, built where every test process can read it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Nothing downloads in a test: the Hugging Face libraries read these once, when first imported
# (dsforget.eval.general_tasks refuses to run otherwise); the ranks tests start inherit them.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def lab_cache(tmp_path_factory) -> Path:
    """DSFORGET_CACHE for the session: the tiny lab is built into it once, on first use."""
    return tmp_path_factory.mktemp("dsforget_cache")


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
