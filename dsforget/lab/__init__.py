"""The lab: a self-contained forgetting experiment that builds and runs on a CPU in minutes.

``build_lab(LabConfig.preset("tiny"))`` generates an invented world from a seed, trains a
tokenizer on it, pretrains a tiny Llama until it recalls the world's facts, and caches the
checkpoint with a fine-tuning task (instruction JSONL) the base model cannot do. Fine-tuning on
the task and scoring ``task_exact_match`` against ``fact_recall`` and ``perplexity`` shows task
gain against forgetting.
"""

from .build import LabArtifacts, build_lab, default_cache_root, lab_dir
from .config import PRESETS, LabConfig
from .corpus import Fact, chance_recall
from .evaluate import fact_recall, perplexity, task_exact_match

__all__ = [
    "PRESETS",
    "Fact",
    "LabArtifacts",
    "LabConfig",
    "build_lab",
    "chance_recall",
    "default_cache_root",
    "fact_recall",
    "lab_dir",
    "perplexity",
    "task_exact_match",
]
