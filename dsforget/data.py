"""Instruction and chat data → token ids with the loss on assistant responses only.

Pipeline: a local file (JSONL read and checked here line by line, so errors carry exact line
numbers; JSON, CSV and Parquet through ``datasets``) → conversations ``[{"role", "content"}]`` →
the tokenizer's chat template (or ``PLAIN_CHAT_TEMPLATE``) → ``input_ids`` and ``labels`` with
``IGNORE_INDEX`` on every token outside an assistant response → padded or packed batches.

Record formats, one per line or row:

- ``{"instruction": str, "input": str (optional), "output": str}``: one user turn (instruction,
  a blank line, input) and one assistant turn (output);
- ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``: every
  assistant turn is trained on.

Labels follow the Hugging Face convention: ``labels[i]`` is the target for position ``i`` and the
model shifts them itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from .errors import ConfigError, InputFileError, UserInputError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
FILE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# Used when the tokenizer has no chat template (base models). An assistant turn ends with eos so
# that the model learns to stop:
#
#   <bos>### User:
#   {content}
#
#   ### Assistant:
#   {content}<eos>
#
PLAIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)

Conversation = list[dict[str, str]]
Example = dict[str, list[int]]
T = TypeVar("T")


class DataError(UserInputError, ValueError):
    """Malformed training data; the message names the file and, where there is one, the line."""


@dataclass(frozen=True)
class DataConfig:
    """Where the training data is and how it becomes batches.

    ``format`` is inferred from the file suffix when left out. With ``packing``, training
    examples are concatenated into blocks of ``max_length`` tokens (see ``pack_examples``);
    validation examples are always kept whole, so validation loss never mixes examples.
    """

    path: str | Path
    format: str | None = None
    max_length: int = 1024
    packing: bool = False
    validation_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.path, str | Path) or not str(self.path):
            raise ConfigError(f"DataConfig.path must be a file path, got {self.path!r}")
        allowed = sorted(set(FILE_FORMATS.values()))
        if self.format is not None and self.format not in allowed:
            raise ConfigError(f"DataConfig.format must be one of {allowed} or left out, got {self.format!r}")
        if self.format is None and Path(self.path).suffix not in FILE_FORMATS:
            raise ConfigError(
                f"DataConfig.format: cannot infer the format of {self.path} from its suffix; "
                f"use one of {sorted(FILE_FORMATS)} or set format to one of {allowed}"
            )
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 2:
            raise ConfigError(f"DataConfig.max_length must be an integer >= 2, got {self.max_length!r}")
        if not isinstance(self.packing, bool):
            raise ConfigError(f"DataConfig.packing must be true or false, got {self.packing!r}")
        if not isinstance(self.validation_fraction, int | float) or not 0 <= self.validation_fraction < 1:
            raise ConfigError(
                f"DataConfig.validation_fraction must be in [0, 1), got {self.validation_fraction!r}"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"DataConfig.seed must be an integer, got {self.seed!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> DataConfig:
        """From a parsed YAML/JSON section; unknown keys are an error, not silently ignored."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown DataConfig key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**values)

    @property
    def file_format(self) -> str:
        return self.format or FILE_FORMATS[Path(self.path).suffix]


@dataclass(frozen=True)
class PreparedData:
    train: list[Example]
    validation: list[Example]


def prepare_data(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Load, split (before tokenizing, so the split does not depend on the tokenizer), tokenize, pack."""
    conversations = load_conversations(config.path, config.file_format)
    train, validation = split_validation(conversations, config.validation_fraction, config.seed)
    train_examples = tokenize_conversations(tokenizer, train, config.max_length)
    if config.packing:
        train_examples = pack_examples(train_examples, config.max_length)
    validation_examples = (
        tokenize_conversations(tokenizer, validation, config.max_length) if validation else []
    )
    return PreparedData(train_examples, validation_examples)


# --- loading -------------------------------------------------------------------------------------


def load_conversations(
    path: str | Path, file_format: str | None = None, source: str = "DataConfig.path"
) -> list[Conversation]:
    """Every record of a local file as a checked conversation; never downloads anything.

    `source` is what the user typed to name the file (a flag, a config key), for the errors."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"data file {path} does not exist ({source})")
    file_format = file_format or FILE_FORMATS.get(path.suffix)
    if file_format == "jsonl":
        conversations = _load_jsonl(path)
    else:
        conversations = [
            to_conversation(record, f"{path}: record {index}")
            for index, record in enumerate(_load_with_datasets(path, file_format), start=1)
        ]
    if not conversations:
        raise DataError(f"{path}: no records (the file is empty)")
    return conversations


def _load_jsonl(path: Path) -> list[Conversation]:
    conversations = []
    with open(path, "rb") as file:
        for line_number, raw_line in enumerate(file, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not valid UTF-8 ({error.reason})") from None
            if not line.strip():
                continue
            try:
                # Without its line end: json would count that as a second line and report
                # "column 1" for a record cut short, instead of the column where it stops.
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
            conversations.append(to_conversation(record, where))
    return conversations


def _load_with_datasets(path: Path, file_format: str | None) -> list[dict]:
    """Rows as dicts, less the None fields ``datasets`` adds to unify the rows' schemas."""
    import datasets  # only these formats need it, and it is slow to import

    try:
        rows = datasets.load_dataset(file_format, data_files=str(path), split="train")
    except Exception as error:  # datasets raises many types; name the file whatever it raised
        raise DataError(f"{path}: could not be read as {file_format}: {error}") from error
    return [{key: value for key, value in row.items() if value is not None} for row in rows]


def to_conversation(record: object, where: str) -> Conversation:
    """Check one record and return it as a conversation; ``where`` prefixes every error."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        if "instruction" in record or "output" in record:
            raise DataError(f"{where}: has both 'messages' and 'instruction'/'output'; use one format")
        return _check_messages(record["messages"], where)
    missing = [key for key in ("instruction", "output") if key not in record]
    if missing:
        raise DataError(
            f"{where}: missing key(s) {missing}; a record needs 'instruction' and 'output' "
            f"(and optionally 'input'), or 'messages'; it has {sorted(record)}"
        )
    for key in ("instruction", "input", "output"):
        value = record.get(key)
        if key == "input" and value is None:  # optional: absent, null, or an empty CSV cell
            continue
        if not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return _check_messages(
        [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}], where
    )


def _check_messages(messages: object, where: str) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for index, message in enumerate(messages):
        item = f"{where}: messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{item} must be an object with a string 'content'")
        if message.get("role") not in ROLES:
            raise DataError(f"{item}: role must be one of {list(ROLES)}, got {message.get('role')!r}")
        if message["role"] == "assistant":
            if index == 0:
                raise DataError(f"{item}: an assistant turn must follow a user or system turn")
            if not message["content"].strip():
                raise DataError(f"{item}: the assistant response is empty, so there is nothing to train on")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no assistant turn, so there is nothing to train on")
    return [{"role": message["role"], "content": message["content"]} for message in messages]


# --- rendering and masking -----------------------------------------------------------------------


def render(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation, add_generation_prompt: bool = False
) -> str:
    """The conversation as text, through the tokenizer's chat template or ``PLAIN_CHAT_TEMPLATE``."""
    template = None
    if not tokenizer.chat_template:
        if tokenizer.eos_token is None:
            raise ValueError(
                "the tokenizer has neither a chat template nor an eos token; the plain template needs "
                "eos to end responses"
            )
        template = PLAIN_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Conversation) -> str:
    """The text a model continues to answer ``messages`` (which ends before the response)."""
    return render(tokenizer, messages, add_generation_prompt=True)


def response_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant response.

    A response's span runs from the end of the generation prompt that precedes it to the end of
    its turn, less trailing whitespace: the content plus the template's end-of-turn token, which
    the model must learn to emit. Works for any template that renders a conversation's first
    turns the same whether or not later turns follow (true of common templates).
    """
    text = render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_prompt(tokenizer, messages[:index])
        through = render(tokenizer, messages[: index + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                f"the chat template of {tokenizer.name_or_path!r} renders turn {index} differently once "
                f"later turns follow, so responses cannot be located for prompt masking"
            )
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation, max_length: int
) -> Example:
    """``input_ids`` and ``labels`` (``IGNORE_INDEX`` outside responses), cut to ``max_length``.

    Tokens are assigned to responses by character offsets, so a token that straddles the
    prompt/response boundary is trained on: the model has to produce it to answer.
    """
    if not tokenizer.is_fast:
        raise ValueError(
            "prompt masking needs a fast tokenizer (character offsets); load it with use_fast=True"
        )
    text, spans = response_spans(tokenizer, messages)
    # The template already holds bos/eos; letting the tokenizer add them again would double them.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"][:max_length]
    offsets = encoding["offset_mapping"][:max_length]
    labels = [
        token
        if any(start < span_end and end > span_start for span_start, span_end in spans)
        else IGNORE_INDEX
        for token, (start, end) in zip(input_ids, offsets, strict=True)
    ]
    return {"input_ids": input_ids, "labels": labels}


def tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Conversation], max_length: int
) -> list[Example]:
    """Tokenized examples, dropping those with no response token left within ``max_length``."""
    examples = [tokenize_conversation(tokenizer, messages, max_length) for messages in conversations]
    kept = [example for example in examples if any(label != IGNORE_INDEX for label in example["labels"])]
    if not kept:
        raise DataError(
            f"no example has a response token within the first {max_length} tokens; "
            "raise DataConfig.max_length"
        )
    if len(kept) < len(examples):
        logger.warning(
            "%d of %d examples have no response token within max_length=%d and are dropped",
            len(examples) - len(kept),
            len(examples),
            max_length,
        )
    return kept


# --- splitting and batching ----------------------------------------------------------------------


def split_validation(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded random split: ``round(fraction * n)`` items (at least one if fraction > 0) to validation.

    The same items, fraction and seed give the same split on every rank and every run; both
    parts keep the items' original order.
    """
    if fraction == 0:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    validation_size = max(1, round(fraction * len(items)))
    if validation_size >= len(items):
        raise DataError(
            f"DataConfig.validation_fraction={fraction} leaves no training examples out of {len(items)}"
        )
    chosen = set(order[:validation_size])
    train = [item for index, item in enumerate(items) if index not in chosen]
    validation = [item for index, item in enumerate(items) if index in chosen]
    return train, validation


def pack_examples(examples: Sequence[Example], block_length: int) -> list[Example]:
    """Concatenate examples and cut the stream into blocks of ``block_length`` (the last may be shorter).

    Labels stay aligned with their tokens, and no loss crosses an example boundary (every
    example starts with prompt tokens, whose labels are ignored). Kept simple on purpose: the
    attention mask and position ids are not reset per example, so tokens attend to earlier
    examples in their block; and the first token of each block is never a target, because the
    model predicts position i from positions before i.
    """
    input_ids = [token for example in examples for token in example["input_ids"]]
    labels = [label for example in examples for label in example["labels"]]
    return [
        {"input_ids": input_ids[start : start + block_length], "labels": labels[start : start + block_length]}
        for start in range(0, len(input_ids), block_length)
    ]


@dataclass(frozen=True)
class PaddingCollator:
    """Right-pads a list of examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""

    pad_token_id: int
    pad_to_multiple_of: int = 1

    @classmethod
    def for_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int = 1
    ) -> PaddingCollator:
        """Pads with the pad token, or eos where there is none (padding is masked out either way)."""
        pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        return cls(pad_token_id, pad_to_multiple_of)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        longest = max(len(example["input_ids"]) for example in examples)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            size = len(example["input_ids"])
            input_ids[row, :size] = torch.tensor(example["input_ids"])
            labels[row, :size] = torch.tensor(example["labels"])
            attention_mask[row, :size] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
