"""A tiny Llama and fixed data shared by the tests and their distributed workers.

Odd widths (hidden 56, head_dim 14, intermediate 98, vocab 211) make ZeRO cut matrices
mid-row; `logit_scale` is a one-element parameter and `never_used` never gets a gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 211
SEQ = 12


def tiny_llama_config(**overrides):
    """The LlamaConfig of TinyLM's Llama, with `overrides` (e.g. attention_dropout, layers)."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=VOCAB,
        hidden_size=56,
        intermediate_size=98,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**values, **overrides})


def tiny_phi3():
    """A Phi-3 of TinyLM's widths: fused qkv_proj of 56 + 2·28 rows and gate_up_proj of 2·98."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(**{**tiny_llama_config().to_diff_dict(), "pad_token_id": 0})
    return Phi3ForCausalLM(config)


class TinyLM(nn.Module):
    """The tiny Llama (or, with family="phi3", Phi-3), registered under the family's name."""

    def __init__(self, family: str = "llama") -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        self.family = family
        self.add_module(family, LlamaForCausalLM(tiny_llama_config()) if family == "llama" else tiny_phi3())
        self.logit_scale = nn.Parameter(torch.ones(1))
        self.never_used = nn.Parameter(torch.randn(3, 7))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = getattr(self, self.family)(input_ids=input_ids).logits * self.logit_scale
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))


def initial_state(seed: int = 0, family: str = "llama") -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in TinyLM(family).state_dict().items()}


def batches(steps: int, world: int, micro_batch: int, seed: int = 1) -> torch.Tensor:
    """Token ids of shape (steps, world, micro_batch, SEQ): rank r trains on column r."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (steps, world, micro_batch, SEQ), generator=generator)


def train_dense(
    model: TinyLM,
    optimizer: torch.optim.Optimizer,
    data: torch.Tensor,
    before_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Single process: each step sees every rank's micro-batch at once (the mean gradient);
    before_step(step) runs before each optimizer step (HFT resampling switches plans there)."""
    losses = []
    for step, step_batches in enumerate(data):
        optimizer.zero_grad()
        loss = model(step_batches.reshape(-1, SEQ))
        loss.backward()
        for param in model.parameters():  # DeepSpeed steps unused parameters with a zero gradient
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        if before_step is not None:
            before_step(step)
        optimizer.step()
        losses.append(loss.item())
    return losses
