"""Turn a ``LabConfig`` into a directory of artifacts, once, however many processes ask.

The directory is named by the config's digest, so any change to the config builds anew. A
build happens in a temporary directory under an exclusive file lock and is published by an
atomic rename: a finished directory is always complete, every other rank blocks on the lock
until it exists, and a crashed build leaves nothing that looks finished.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from ..data import load_conversations, render, to_conversation
from ..data_cache import cache_root
from .config import LabConfig
from .corpus import Fact, chance_recall, generate_corpus, read_facts, read_texts, write_jsonl
from .evaluate import fact_recall, perplexity, task_exact_match
from .model import build_base_model
from .tokenizer import train_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabArtifacts:
    """Paths of one built lab. ``model_dir`` is a Hugging Face checkpoint with its tokenizer."""

    root: Path
    config: LabConfig

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def tokenizer_dir(self) -> Path:
        """The same as ``model_dir``: the tokenizer ships inside the checkpoint."""
        return self.model_dir

    @property
    def general_train(self) -> Path:
        """``{"text": ...}`` JSONL the base model was pretrained on (e.g. for importance estimates)."""
        return self.root / "data" / "pretrain.jsonl"

    @property
    def task_train(self) -> Path:
        """Instruction/output JSONL in the format ``dsforget.data`` reads."""
        return self.root / "data" / "task_train.jsonl"

    @property
    def task_eval(self) -> Path:
        return self.root / "data" / "task_eval.jsonl"

    @property
    def skill_eval(self) -> Path:
        """Instruction JSONL of held-out lists of the chat skills an aligned base was pretrained
        on (empty for a lab without skills): versatility that fine-tuning may erode."""
        return self.root / "data" / "skill_eval.jsonl"

    @property
    def general_heldout(self) -> Path:
        """``{"text": ...}`` JSONL of general text the base model never saw, for perplexity."""
        return self.root / "data" / "general_heldout.jsonl"

    @property
    def facts(self) -> Path:
        """``{"relation", "prompt", "answer"}`` JSONL of every fact the corpus states."""
        return self.root / "data" / "facts.jsonl"

    @property
    def build_info(self) -> Path:
        """JSON with the build's time, parameter count, final loss and base-model metrics."""
        return self.root / "build_info.json"

    def load_facts(self) -> list[Fact]:
        return read_facts(self.facts)

    def load_heldout_texts(self) -> list[str]:
        return read_texts(self.general_heldout)

    def load_task_eval(self) -> list[dict]:
        return _read_records(self.task_eval)

    def load_skill_eval(self) -> list[dict]:
        return _read_records(self.skill_eval)


def _read_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def default_cache_root() -> Path:
    """``$DSFORGET_CACHE/lab``, or ``~/.cache/dsforget/lab``."""
    return cache_root() / "lab"


def lab_dir(config: LabConfig, cache_root: str | Path | None = None) -> Path:
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root / f"{config.name}-{config.digest()[:16]}"


def build_lab(config: LabConfig | None = None, cache_root: str | Path | None = None) -> LabArtifacts:
    """The lab's artifacts for ``config`` (default preset if None), built on first use.

    Safe to call from every rank at once: one builds, the others wait and reuse its result.
    """
    config = config or LabConfig()
    target = lab_dir(config, cache_root)
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f"{target.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("waiting for another process to build the lab in %s", target)
                fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.is_dir():  # whoever held the lock before us may have built it
                _build_and_publish(config, target)
    return LabArtifacts(target, config)


def _build_and_publish(config: LabConfig, target: Path) -> None:
    # Holding the lock, no one else builds into this name: leftovers are from crashed builds.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        logger.info("building the lab (%s) in %s", config.name, target)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # transformers writes checkpoints only from global rank 0 of an initialised process
            # group; a clean child process lets whichever rank holds the lock build the lab.
            command = [
                sys.executable,
                "-m",
                "dsforget.lab",
                "--build-into",
                str(staging),
                "--config-json",
                json.dumps(asdict(config)),
            ]
            subprocess.run(command, check=True)
        else:
            _build(config, staging)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def chat_document(tokenizer: PreTrainedTokenizerBase, record: dict[str, str]) -> str:
    """An instruction record as pretraining text: its chat rendering less the leading bos and the
    final eos, which the pretraining token stream adds around every document."""
    text = render(tokenizer, to_conversation(record, "a lab chat example"))
    return text.removeprefix(tokenizer.bos_token).removesuffix(tokenizer.eos_token)


def _build(config: LabConfig, root: Path) -> None:
    start = time.perf_counter()
    artifacts = LabArtifacts(root, config)
    corpus = generate_corpus(config)
    artifacts.task_train.parent.mkdir(parents=True)
    write_jsonl(artifacts.general_heldout, ({"text": text} for text in corpus.heldout_documents))
    write_jsonl(artifacts.facts, (asdict(fact) for fact in corpus.facts))
    write_jsonl(artifacts.task_train, corpus.task_train)
    write_jsonl(artifacts.task_eval, corpus.task_eval)
    write_jsonl(artifacts.skill_eval, corpus.skill_eval)
    load_conversations(artifacts.task_train)  # the task files must pass the data pipeline's checks

    chat_texts = [
        f"{example['instruction']}\n\n{example.get('input', '')}\n{example['output']}"
        for example in corpus.task_train + corpus.chat_examples
    ]
    tokenizer = train_tokenizer(
        corpus.pretrain_documents + chat_texts, config.vocab_size, config.max_position_embeddings
    )
    documents = corpus.pretrain_documents
    if corpus.chat_examples:  # interleaved, so that every stretch of pretraining sees both
        documents = documents + [chat_document(tokenizer, record) for record in corpus.chat_examples]
        random.Random(config.seed).shuffle(documents)
    write_jsonl(artifacts.general_train, ({"text": text} for text in documents))
    pretrained = build_base_model(config, tokenizer, documents, artifacts.model_dir)
    model = AutoModelForCausalLM.from_pretrained(artifacts.model_dir)
    info = {
        "config": asdict(config),
        "digest": config.digest(),
        "parameters": pretrained.parameters,
        "pretrain_seconds": round(pretrained.seconds, 1),
        "final_pretrain_loss": round(pretrained.final_loss, 4),
        "base_fact_recall": fact_recall(model, tokenizer, corpus.facts),
        "chance_fact_recall": round(chance_recall(corpus.facts), 4),
        "base_heldout_perplexity": round(perplexity(model, tokenizer, corpus.heldout_documents), 3),
        "base_task_exact_match": task_exact_match(model, tokenizer, corpus.task_eval),
        "base_skill_exact_match": (
            task_exact_match(model, tokenizer, corpus.skill_eval) if corpus.skill_eval else None
        ),
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    artifacts.build_info.write_text(json.dumps(info, indent=2) + "\n")
