"""General-ability and task metrics for any Hugging Face causal LM (the lab's or a real one).

Each metric runs under ``torch.no_grad`` in eval mode and restores the mode after. In one
process it scores every item with a plain model. Given ``ranks`` (``Ranks.of_engine``), every
rank scores its own slice of the items with the model DeepSpeed holds (ZeRO-3 partitions
included) and the counts are summed over ranks: no rank needs a whole copy of the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data import render_prompt, to_conversation
from .corpus import Fact

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """The ranks that compute a metric together, each on its own slice of the items (strided:
    slices differ by one item at most), counts summed over ranks.

    ``synced``: every rank must run every forward pass because ZeRO-3 gathers the parameters
    inside it. A rank with fewer items then runs padding batches whose results are dropped,
    and generation runs with ``synced_gpus`` (as transformers' Trainer does under ZeRO-3).
    """

    rank: int = 0
    world: int = 1
    synced: bool = False

    @classmethod
    def of_engine(cls, engine: Any) -> Ranks:
        """This process's place among the ranks of a DeepSpeed engine."""
        from deepspeed import comm

        return cls(comm.get_rank(), comm.get_world_size(), engine.zero_optimization_stage() == 3)

    def batches(self, items: Sequence[T], batch_size: int) -> Iterator[tuple[list[T], bool]]:
        """This rank's batches of `items`, each with whether it counts (False: padding)."""
        mine = list(items[self.rank :: self.world])
        largest_slice = math.ceil(len(items) / self.world) if self.synced else len(mine)
        for index in range(math.ceil(largest_slice / batch_size)):
            batch = mine[index * batch_size : (index + 1) * batch_size]
            yield (batch, True) if batch else (list(items[:1]), False)

    def total(self, values: Sequence[float], device: torch.device) -> list[float]:
        """`values` summed over the ranks (float64). Collective when there are several."""
        if self.world == 1:
            return list(values)
        summed = torch.tensor(list(values), dtype=torch.float64, device=device)
        torch.distributed.all_reduce(summed)
        return summed.tolist()


ONE_PROCESS = Ranks()


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.device]:
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
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Fact],
    batch_size: int = 64,
    ranks: Ranks = ONE_PROCESS,
) -> float:
    """Fraction of facts whose answer greedy decoding produces exactly, token for token.

    Scored with one teacher-forced forward pass: greedy decoding emits the answer exactly when
    the argmax at every answer position is the answer's next token, given the answer so far.
    """
    hits = 0
    with evaluating(model) as device:
        for batch, counts in ranks.batches(facts, batch_size):
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
            for row, full_ids in enumerate(rows if counts else ()):
                first = prompt_lengths[row]
                # logits at position i predict token i + 1
                answer_predicted = predicted[row, first - 1 : len(full_ids) - 1]
                hits += bool(torch.equal(answer_predicted.cpu(), torch.tensor(full_ids[first:])))
        (hits,) = ranks.total([hits], device)
    return hits / len(facts)


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 16,
    ranks: Ranks = ONE_PROCESS,
) -> float:
    """exp of the mean negative log-likelihood per predicted token, over all texts together."""
    total_nll, total_tokens = 0.0, 0
    max_length = model.config.max_position_embeddings
    with evaluating(model) as device:
        for batch, counts in ranks.batches(texts, batch_size):
            rows = tokenizer(batch, truncation=True, max_length=max_length)
            ids, mask = _right_padded(rows["input_ids"], _pad_id(tokenizer), device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            if not counts:
                continue
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total_nll += F.cross_entropy(
                logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum"
            ).item()
            total_tokens += int((targets != -100).sum())
        total_nll, total_tokens = ranks.total([total_nll, total_tokens], device)
    return math.exp(total_nll / total_tokens)


def task_exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict],
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    ranks: Ranks = ONE_PROCESS,
) -> float:
    """Fraction of records whose greedy answer, after the chat template, equals the reference.

    ``records`` are instruction or chat records (``dsforget.data`` formats); the reference is the
    last assistant turn and the prompt is everything before it. Both sides are compared with
    surrounding whitespace stripped. ``max_new_tokens`` defaults to the longest reference's
    length plus a margin of 8 tokens: enough to reach the reference and see what follows.
    """
    conversations = []
    for index, record in enumerate(records):
        conversation = to_conversation(record, f"records[{index}]")
        if conversation[-1]["role"] != "assistant":
            raise ValueError(f"records[{index}] must end with the assistant turn to compare against")
        conversations.append(conversation)
    if max_new_tokens is None:
        max_new_tokens = (
            max(
                len(tokenizer(c[-1]["content"].strip(), add_special_tokens=False)["input_ids"])
                for c in conversations
            )
            + 8
        )
    hits = 0
    with evaluating(model) as device:
        for batch, counts in ranks.batches(conversations, batch_size):
            rows = [
                tokenizer(render_prompt(tokenizer, c[:-1]), add_special_tokens=False)["input_ids"]
                for c in batch
            ]
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
                synced_gpus=ranks.synced and ranks.world > 1,
            )
            if not counts:
                continue
            answers = tokenizer.batch_decode(generated[:, length:], skip_special_tokens=True)
            hits += sum(
                answer.strip() == c[-1]["content"].strip() for answer, c in zip(answers, batch, strict=True)
            )
        (hits,) = ranks.total([hits], device)
    return hits / len(conversations)
