"""The lab's configuration: every field shapes the built artifacts, so every field is hashed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from .skills import TRANSFORMS

# Bump when the generator, tokenizer or pretraining code changes what a config builds: the cache
# key includes it, so stale artifacts from older code are never reused.
LAB_FORMAT_VERSION = 2

# The byte-level BPE alphabet alone takes 256 ids; the special tokens a few more.
MIN_VOCAB_SIZE = 300
# Counts that may be 0: an unaligned lab has no skills.
_ALIGNMENT_COUNTS = {"skill_examples", "skill_eval_examples", "fact_question_repeats"}


@dataclass(frozen=True)
class LabConfig:
    """World, corpus, tokenizer, model and pretraining sizes of one lab build.

    The defaults are the "plain" preset's sizes; ``LabConfig.preset("default")`` is the aligned
    lab ``make demo`` runs, ``LabConfig.preset("tiny")`` the one tests use.
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
    # Fine-tuning task (the speciality): a word-list transformation of dsforget/lab/skills.py.
    task: str = "reverse"
    task_train_examples: int = 2000
    task_eval_examples: int = 200
    task_min_words: int = 3
    task_max_words: int = 4
    # An aligned base: chat examples of these skills (word-list transformations other than the
    # task) and each fact asked as a chat question, mixed into pretraining. Empty: the base model
    # never sees a chat turn. skill_eval_examples held-out lists per skill score versatility.
    skills: tuple[str, ...] = ()
    skill_examples: int = 0
    skill_eval_examples: int = 0
    fact_question_repeats: int = 0
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
        counts = [f.name for f in dataclasses.fields(self) if f.type == "int" and f.name != "seed"]
        for key in counts:
            value = getattr(self, key)
            least = 0 if key in _ALIGNMENT_COUNTS else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"LabConfig.{key} must be an integer >= {least}, got {value!r}")
        # a list from JSON (the build's child process, a cached config) is the same tuple
        object.__setattr__(self, "skills", tuple(self.skills))
        unknown = [name for name in (self.task, *self.skills) if name not in TRANSFORMS]
        if unknown:
            raise ValueError(
                f"LabConfig: unknown task or skill {unknown[0]!r}; choose from {', '.join(TRANSFORMS)}"
            )
        if self.task in self.skills or len(set(self.skills)) != len(self.skills):
            raise ValueError(
                f"LabConfig.skills {list(self.skills)} must be distinct and must not include "
                f"the task {self.task!r}"
            )
        if self.skills and not (self.skill_examples and self.skill_eval_examples):
            raise ValueError("LabConfig.skills needs skill_examples >= 1 and skill_eval_examples >= 1")
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


# Builds in well under a minute on 2 CPU cores, for tests.
_TINY = LabConfig(
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
)

PRESETS: dict[str, LabConfig] = {
    # The papers' regime: an instruction-following base (chat skills and fact questions in its
    # pretraining) fine-tuned on a speciality it has never seen, whose answers use words it knows.
    "default": LabConfig(
        task="encode",
        skills=("reverse", "sort", "rotate", "double"),
        skill_examples=1000,
        skill_eval_examples=50,
        fact_question_repeats=10,
        hidden_size=96,
        num_layers=8,
        intermediate_size=256,
    ),
    # A base that has never seen a chat turn, fine-tuned to reverse word lists: every method must
    # first learn the chat format (the continual-learning lab uses its tasks in a row).
    "plain": LabConfig(name="plain"),
    "tiny": _TINY,
    # The aligned lab at the tiny lab's sizes, for tests of the versatility metric.
    "tiny_aligned": dataclasses.replace(
        _TINY,
        name="tiny_aligned",
        task="encode",
        skills=("reverse", "rotate"),
        skill_examples=400,
        skill_eval_examples=10,
        fact_question_repeats=2,
        task_max_words=3,  # a 2-layer model copies 3-word lists reliably, 4-word ones not
        pretrain_steps=800,
    ),
}
