"""The lab's base model: a tiny Llama pretrained on the lab corpus with a plain AdamW loop."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from .config import LabConfig


@dataclass(frozen=True)
class PretrainResult:
    parameters: int
    final_loss: float
    seconds: float


def llama_config(config: LabConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """Llama with grouped-query attention and untied embeddings, like the checkpoints dsforget targets."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_base_model(
    config: LabConfig, tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], output_dir: Path
) -> PretrainResult:
    """Pretrain a fresh model on ``documents`` and save it (safetensors) with the tokenizer."""
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(llama_config(config, tokenizer))
    start = time.perf_counter()
    final_loss = pretrain(model, token_stream(tokenizer, documents), config)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return PretrainResult(
        parameters=sum(p.numel() for p in model.parameters()),
        final_loss=final_loss,
        seconds=time.perf_counter() - start,
    )


def token_stream(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str]) -> torch.Tensor:
    """All documents as one 1-D tensor of ids, each document as ``bos ... eos``."""
    ids: list[int] = []
    for encoded in tokenizer(list(documents))["input_ids"]:
        ids += encoded + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def pretrain(model: LlamaForCausalLM, stream: torch.Tensor, config: LabConfig) -> float:
    """AdamW with linear warmup and cosine decay to 10% on random windows of ``stream``.

    Returns the mean loss of the last 10% of steps. Random windows rather than fixed blocks:
    every step sees fresh document boundaries, at no cost in data.
    """
    if len(stream) <= config.seq_length:
        raise ValueError(
            f"the lab corpus has {len(stream)} tokens, fewer than LabConfig.seq_length "
            f"({config.seq_length}); raise pretrain_documents"
        )
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.1
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    offsets = torch.arange(config.seq_length)
    tail_steps = max(1, config.pretrain_steps // 10)
    tail_losses = []
    model.train()
    for step in range(config.pretrain_steps):
        starts = torch.randint(
            0, len(stream) - config.seq_length, (config.batch_size, 1), generator=generator
        )
        batch = stream[starts + offsets]  # (batch_size, seq_length)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= config.pretrain_steps - tail_steps:
            tail_losses.append(loss.item())
    model.eval()
    return sum(tail_losses) / len(tail_losses)


def _lr_factor(step: int, config: LabConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.pretrain_steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
