"""The fine level of a CoFiTune run: compute unit importance once, keep it as an artifact.

Importance is measured on general data by default (what the model should not forget): the
lab's pretraining corpus, or the run's ``general_text`` file for a real checkpoint; with
``importance_data: train`` on the training data instead. Each rank scores its own share of
the batches and the results are averaged (dsforget.methods.cofitune.importance). The pass runs
on the accelerator: under ZeRO-3 one block at a time, under ZeRO-0/1/2 on the whole model moved
there first (as ``deepspeed.initialize`` would move it next). The artifact lands in
``<output_dir>/importance.safetensors`` before training starts; a rerun of the same output_dir
reuses it, so a resumed run keeps the row scales it started with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from ..data import unpack
from ..integration.block_gather import is_partitioned
from .run_config import RunConfig

logger = logging.getLogger("dsforget")

ARTIFACT = "importance.safetensors"


def needs_importance(config: RunConfig) -> bool:
    """CoFiTune without an importance file given: the fine level is computed in this job."""
    return "cofitune" in config.method.split("+") and "importance" not in config.method_options


def _general_texts(config: RunConfig) -> tuple[list[str], str]:
    if config.general_text:
        from .inputs import read_general_texts

        return read_general_texts(config.general_text), config.general_text
    if config.uses_lab:
        from ..lab import LabConfig, build_lab
        from ..lab.corpus import read_texts

        lab = build_lab(LabConfig.preset(config.lab_preset))
        return read_texts(lab.general_train), "lab pretraining corpus"
    raise ValueError(
        "importance_data: 'general' needs --general_text for a checkpoint directory "
        "(or set importance_data: train, or give method_options.importance)"
    )


def _text_batches(texts: Sequence[str], tokenizer: Any, config: RunConfig, count: int) -> Iterator[dict]:
    size = config.micro_batch_size
    for start in range(0, min(len(texts), count * size), size):
        encoded = tokenizer(
            list(texts[start : start + size]),
            truncation=True,
            max_length=config.max_length,
            padding=True,
            return_tensors="pt",
        )
        yield {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@contextmanager
def activation_checkpointing_off(model: nn.Module) -> Iterator[bool]:
    """Gradient (activation) checkpointing off inside the block, each layer's setting restored after;
    yields whether any layer had it on.

    CoFiTune's importance pass needs it off, whichever kind: recomputing a layer in the backward
    pass runs its forward hooks again, and the pass's sequence dropout draws from per-sequence
    generators that have moved on since the forward pass, so the recomputed activations would
    differ from the ones the loss saw and the mask gradients would be wrong (compute_importance
    refuses a checkpointing model for this reason). The per-module ``gradient_checkpointing`` flags
    are saved and restored rather than re-enabled, so the run's own checkpointing settings
    (non-reentrant, every layer) come back exactly.
    """
    flags = {
        module: module.gradient_checkpointing
        for module in model.modules()
        if isinstance(getattr(module, "gradient_checkpointing", None), bool)
    }
    try:
        for module in flags:
            module.gradient_checkpointing = False
        yield any(flags.values())
    finally:
        for module, flag in flags.items():
            module.gradient_checkpointing = flag


def ensure_importance(
    config: RunConfig,
    model: nn.Module,
    tokenizer: Any,
    train_examples: Sequence[dict],
    collator: Callable[[Sequence[dict]], dict],
    output: Path,
    rank: int,
    world: int,
) -> Path:
    """The path of this run's importance artifact, computed now if it does not exist. Collective."""
    from deepspeed import comm

    from ..methods.cofitune.importance import compute_importance

    path = output / ARTIFACT
    if path.exists():
        logger.info("CoFiTune importance: reusing %s", path)
        return path
    count = config.importance_batches * world
    if config.importance_data == "train":
        size = config.micro_batch_size
        examples: list[dict] = []  # one per row: packed blocks are split into their examples
        for index in range(len(train_examples)):
            if len(examples) >= count * size:
                break
            examples.extend(unpack(train_examples[index]))
        examples = examples[: count * size]
        batches = [collator(examples[i : i + size]) for i in range(0, len(examples), size)]
        source = f"training data {config.data or 'lab task'}"
    else:
        texts, source = _general_texts(config)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batches = list(_text_batches(texts, tokenizer, config, count))
    batches = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches]
    logger.info("CoFiTune importance: %d batches of %s over %d ranks", len(batches), source, world)
    if not is_partitioned(model):  # ZeRO-0/1/2: the model is still where from_pretrained put it
        from deepspeed.accelerator import get_accelerator

        model.to(get_accelerator().current_device_name())  # where DeepSpeed will train it anyway
    with activation_checkpointing_off(model) as was_on:
        if was_on:
            logger.warning(
                "CoFiTune importance runs with gradient checkpointing off (recomputation would redraw its "
                "dropout): its activation memory is that of two unchecked forward passes of a micro-batch "
                "of %d x %d tokens; lower --micro_batch_size if it does not fit",
                config.micro_batch_size,
                config.max_length,
            )
        importance = compute_importance(model, batches[rank::world], seed=config.seed, source=source)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        importance.save(path)
    comm.barrier()
    return path
