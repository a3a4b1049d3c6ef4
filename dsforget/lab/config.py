"""The lab's configuration: every field shapes the built artifacts, so every field is hashed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

# Bump when the generator, tokenizer or pretraining code changes what a config builds: the cache
# key includes it, so stale artifacts from older code are never reused.
LAB_FORMAT_VERSION = 1

# The byte-level BPE alphabet alone takes 256 ids; the special tokens a few more.
MIN_VOCAB_SIZE = 300


@dataclass(frozen=True)
class LabConfig:
    """World, corpus, tokenizer, model and pretraining sizes of one lab build.

    The defaults are the "default" preset; ``LabConfig.preset("tiny")`` is the one tests use.
    """

    name: str = "default"
    seed: int = 0
    # World: each country has a capital; each person a birth city, a profession and a colour.
    countries: int = 24
    people: int = 48
    # Pretraining corpus: documents mixing fact statements and filler sentences.
    pretrain_documents: int = 3000
    sentences_per_document: int = 6
    heldout_documents: int = 200
    # Fine-tuning task: reverse a short list of words.
    task_train_examples: int = 2000
    task_eval_examples: int = 200
    task_min_words: int = 3
    task_max_words: int = 4
    # Tokenizer and model (Llama architecture with grouped-query attention).
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 344
    max_position_embeddings: int = 256
    # Pretraining (single-process AdamW on random windows of the token stream).
    seq_length: int = 64
    batch_size: int = 32
    pretrain_steps: int = 1000
    learning_rate: float = 3e-3
    warmup_steps: int = 100

    def __post_init__(self) -> None:
        positive = [f.name for f in dataclasses.fields(self) if f.type == "int" and f.name != "seed"]
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LabConfig.{key} must be a positive integer, got {value!r}")
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"LabConfig.name must be letters, digits, '-' or '_', got {self.name!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"LabConfig.seed must be an integer, got {self.seed!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"LabConfig.learning_rate must be > 0, got {self.learning_rate!r}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"LabConfig.vocab_size must be >= {MIN_VOCAB_SIZE}, got {self.vocab_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"LabConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LabConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.task_min_words > self.task_max_words:
            raise ValueError(
                f"LabConfig.task_min_words ({self.task_min_words}) must be <= task_max_words "
                f"({self.task_max_words})"
            )
        if self.seq_length > self.max_position_embeddings:
            raise ValueError(
                f"LabConfig.seq_length ({self.seq_length}) must be <= max_position_embeddings "
                f"({self.max_position_embeddings})"
            )
        if self.warmup_steps > self.pretrain_steps:
            raise ValueError(
                f"LabConfig.warmup_steps ({self.warmup_steps}) must be <= pretrain_steps "
                f"({self.pretrain_steps})"
            )

    @classmethod
    def preset(cls, name: str, /, **overrides: object) -> LabConfig:
        """A named preset, with any field overridden (``LabConfig.preset("tiny", seed=3)``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown lab preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def digest(self) -> str:
        """Hex SHA-256 of every field and the code's format version: the cache key."""
        payload = {"lab_format_version": LAB_FORMAT_VERSION, **dataclasses.asdict(self)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


PRESETS: dict[str, LabConfig] = {
    "default": LabConfig(),
    # Builds in well under a minute on 2 CPU cores, for tests.
    "tiny": LabConfig(
        name="tiny",
        countries=8,
        people=16,
        pretrain_documents=600,
        heldout_documents=50,
        task_train_examples=1000,
        task_eval_examples=50,
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=176,
        max_position_embeddings=128,
        seq_length=64,
        batch_size=32,
        pretrain_steps=400,
        warmup_steps=40,
    ),
}
