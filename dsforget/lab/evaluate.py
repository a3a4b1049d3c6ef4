"""General-ability and task metrics for any Hugging Face causal LM (the lab's or a real one).

The functions take a plain model whose parameters are all present: under ZeRO-3 the caller
gathers them first. Each runs under ``torch.no_grad`` in eval mode and restores the mode after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import render_prompt, to_conversation
from .corpus import Fact


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[torch.device]:
    """Eval mode and no autograd for the block, which gets the model's device; mode restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _right_padded(
    rows: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row)
        mask[index, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def fact_recall(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact], batch_size: int = 64
) -> float:
    """Fraction of facts whose answer greedy decoding produces exactly, token for token.

    Scored with one teacher-forced forward pass: greedy decoding emits the answer exactly when
    the argmax at every answer position is the answer's next token, given the answer so far.
    """
    hits = 0
    with _evaluating(model) as device:
        for start in range(0, len(facts), batch_size):
            batch = facts[start : start + batch_size]
            rows, prompt_lengths = [], []
            for fact in batch:
                prompt_ids = tokenizer(fact.prompt)["input_ids"]
                full_ids = tokenizer(fact.prompt + fact.answer)["input_ids"]
                if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
                    raise ValueError(
                        f"the answer of fact {fact.prompt!r} -> {fact.answer!r} does not start on a token "
                        f"boundary of this tokenizer; give the answer its leading space"
                    )
                rows.append(full_ids)
                prompt_lengths.append(len(prompt_ids))
            ids, mask = _right_padded(rows, _pad_id(tokenizer), device)
            predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(dim=-1)
            for row, full_ids in enumerate(rows):
                first = prompt_lengths[row]
                # logits at position i predict token i + 1
                answer_predicted = predicted[row, first - 1 : len(full_ids) - 1]
                hits += bool(torch.equal(answer_predicted.cpu(), torch.tensor(full_ids[first:])))
    return hits / len(facts)


def perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 16
) -> float:
    """exp of the mean negative log-likelihood per predicted token, over all texts together."""
    total_nll, total_tokens = 0.0, 0
    max_length = model.config.max_position_embeddings
    with _evaluating(model) as device:
        for start in range(0, len(texts), batch_size):
            rows = tokenizer(list(texts[start : start + batch_size]), truncation=True, max_length=max_length)
            ids, mask = _right_padded(rows["input_ids"], _pad_id(tokenizer), device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total_nll += F.cross_entropy(
                logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum"
            ).item()
            total_tokens += int((targets != -100).sum())
    return float(torch.exp(torch.tensor(total_nll / total_tokens)))


def task_exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict],
    batch_size: int = 32,
    max_new_tokens: int | None = None,
) -> float:
    """Fraction of records whose greedy answer, after the chat template, equals the reference.

    ``records`` are instruction or chat records (``dsforget.data`` formats); the reference is the
    last assistant turn and the prompt is everything before it. Both sides are compared with
    surrounding whitespace stripped. ``max_new_tokens`` defaults to the longest reference's
    length plus a margin of 8 tokens: enough to reach the reference and see what follows.
    """
    prompts, references = [], []
    for index, record in enumerate(records):
        conversation = to_conversation(record, f"records[{index}]")
        if conversation[-1]["role"] != "assistant":
            raise ValueError(f"records[{index}] must end with the assistant turn to compare against")
        prompts.append(
            tokenizer(render_prompt(tokenizer, conversation[:-1]), add_special_tokens=False)["input_ids"]
        )
        references.append(conversation[-1]["content"].strip())
    if max_new_tokens is None:
        max_new_tokens = (
            max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references) + 8
        )
    hits = 0
    with _evaluating(model) as device:
        for start in range(0, len(prompts), batch_size):
            rows = prompts[start : start + batch_size]
            # Left padding, so every prompt ends where generation starts.
            length = max(len(row) for row in rows)
            ids = torch.tensor(
                [[_pad_id(tokenizer)] * (length - len(row)) + row for row in rows], device=device
            )
            mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows], device=device)
            generated = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=_pad_id(tokenizer),
            )
            answers = tokenizer.batch_decode(generated[:, length:], skip_special_tokens=True)
            hits += sum(
                answer.strip() == reference
                for answer, reference in zip(answers, references[start : start + batch_size], strict=True)
            )
    return hits / len(prompts)
