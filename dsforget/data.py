"""Instruction and chat data → token ids with the loss on assistant responses only.

Pipeline: a local file (JSONL read and checked here line by line, so errors carry exact line
numbers; JSON, CSV and Parquet through ``datasets``) → conversations ``[{"role", "content"}]`` →
the tokenizer's chat template (or ``PLAIN_CHAT_TEMPLATE``) → ``input_ids`` and ``labels`` with
``IGNORE_INDEX`` on every token outside an assistant response → padded or packed batches.

Record formats, one per line or row:

- ``{"instruction": str, "input": str (optional), "output": str}``: one user turn (instruction,
  a blank line, input) and one assistant turn (output);
- ``{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]}``:
  every assistant turn is trained on; ``tool`` turns (a tool's output, where the chat template
  renders them) are context, like user turns.

Plain-text records (``DataConfig.text``, the replay data of ``dsforget.mixing``): ``{"text": str}``
per JSONL line, tokenised as the tokenizer encodes a document (its bos where it adds one) plus
eos, with the loss on every token (language modelling, as in pretraining).

Labels follow the Hugging Face convention: ``labels[i]`` is the target for position ``i`` and the
model shifts them itself.

Tokenisation runs through ``datasets.Dataset.map`` (``num_proc`` processes, a progress bar), so
prepared data are ``datasets.Dataset`` objects (``len``, ``data[i]`` → an example dict);
``dsforget.data_cache`` keeps them on disk, memory-mapped, keyed by everything they depend on.

Packing (``pack_examples``) puts whole examples into blocks of at most ``max_length`` tokens with
``position_ids`` that restart at 0 for every example; ``PaddingCollator`` then leaves out the
attention mask, which is how transformers recognises packed sequences ("padding-free" packing:
``masking_utils.find_packed_sequence_indices`` builds a block-diagonal causal mask for sdpa and
eager, flash-attention takes the boundaries from the position ids), so no example attends to
another and a packed batch has the loss of its examples run one by one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from .errors import ConfigError, InputFileError, UserInputError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
RECORDS_PER_PROCESS = 1000
PACKED_COLUMNS = ("input_ids", "labels", "position_ids")
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


class TokenizerError(UserInputError, ValueError):
    """A tokenizer or chat template that cannot turn the data into masked tokens; the message names
    the tokenizer and, where one record is the trigger, its file and line."""


@dataclass(frozen=True)
class DataConfig:
    """Where the training data is and how it becomes batches.

    ``format`` is inferred from the file suffix when left out. With ``packing``, whole training
    examples share blocks of up to ``max_length`` tokens without attending to each other (see
    ``pack_examples``); validation examples are always batched one per row.

    ``text``: the file holds plain-text ``{"text"}`` JSONL records, trained on every token
    (``tokenize_texts``), not conversations; ``exclude_texts`` are dropped from it (the held-out
    text that measures forgetting, which replay must not train on).
    """

    path: str | Path
    format: str | None = None
    max_length: int = 1024
    packing: bool = False
    validation_fraction: float = 0.0
    seed: int = 0
    text: bool = False
    exclude_texts: frozenset[str] = frozenset()

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
        if not isinstance(self.text, bool):
            raise ConfigError(f"DataConfig.text must be true or false, got {self.text!r}")
        if self.text and self.file_format != "jsonl":
            raise ConfigError(f"DataConfig.text: plain-text records are read from JSONL, not {self.path}")
        object.__setattr__(self, "exclude_texts", frozenset(self.exclude_texts))

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
    """Tokenised examples (``datasets.Dataset``, or a list where there is nothing to tokenise):
    ``train[i]`` and ``validation[i]`` are dicts of ``input_ids``, ``labels`` (and ``position_ids``
    for packed blocks)."""

    train: Sequence[Example]
    validation: Sequence[Example]


def prepare_data(config: DataConfig, tokenizer: PreTrainedTokenizerBase, num_proc: int = 1) -> PreparedData:
    """Load, split (before tokenizing, so the split does not depend on the tokenizer), tokenize with
    `num_proc` processes, pack. ``dsforget.data_cache.prepare_cached`` does this once per input."""
    if config.text:
        texts = load_texts(config.path)
        kept = [(where, text) for where, text in texts if text not in config.exclude_texts]
        if len(kept) < len(texts):
            logger.info(
                "%s: %d of %d documents are held-out text (DataConfig.exclude_texts) and are left out",
                config.path,
                len(texts) - len(kept),
                len(texts),
            )
        if not kept:
            raise DataError(f"{config.path}: every document is held-out text; nothing is left to train on")
        records: list = kept
        tokenize = tokenize_texts
    else:
        records = load_records(config.path, config.file_format)
        tokenize = tokenize_records
    train, validation = split_validation(records, config.validation_fraction, config.seed)
    train_examples = tokenize(tokenizer, train, config.max_length, num_proc)
    if config.packing:
        train_examples = pack_dataset(train_examples, config.max_length)
    validation_examples = tokenize(tokenizer, validation, config.max_length, num_proc) if validation else []
    return PreparedData(train_examples, validation_examples)


# --- loading -------------------------------------------------------------------------------------


def load_conversations(
    path: str | Path, file_format: str | None = None, source: str = "DataConfig.path"
) -> list[Conversation]:
    """Every record of a local file as a checked conversation; never downloads anything.

    `source` is what the user typed to name the file (a flag, a config key), for the errors."""
    return [conversation for _, conversation in load_records(path, file_format, source)]


def load_records(
    path: str | Path, file_format: str | None = None, source: str = "DataConfig.path"
) -> list[tuple[str, Conversation]]:
    """``load_conversations`` with each record's location (``file:line`` or ``file: record n``),
    which later errors (a chat template that cannot render it) name."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"data file {path} does not exist ({source})")
    file_format = file_format or FILE_FORMATS.get(path.suffix)
    if file_format == "jsonl":
        records = _load_jsonl(path)
    else:
        records = []
        for index, record in enumerate(_load_with_datasets(path, file_format), start=1):
            where = f"{path}: record {index}"
            records.append((where, to_conversation(record, where)))
    if not records:
        raise DataError(f"{path}: no records (the file is empty)")
    return records


def _jsonl_records(path: Path, named_by: str = "") -> Iterator[tuple[str, Any]]:
    """``(file:line, parsed record)`` for every non-blank line of a JSONL file; a line that is not
    UTF-8 or not JSON is a DataError naming the file, the line and `named_by` (the flag)."""
    suffix = f" ({named_by})" if named_by else ""
    with open(path, "rb") as file:
        for line_number, raw_line in enumerate(file, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not valid UTF-8 ({error.reason}){suffix}") from None
            if not line.strip():
                continue
            try:
                # Without its line end: json would count that as a second line and report
                # "column 1" for a record cut short, instead of the column where it stops.
                record = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as error:
                message = f"invalid JSON ({error.msg} at column {error.colno})"
                raise DataError(f"{where}: {message}{suffix}") from None
            yield where, record


def _load_jsonl(path: Path) -> list[tuple[str, Conversation]]:
    return [(where, to_conversation(record, where)) for where, record in _jsonl_records(path)]


def load_texts(path: str | Path, source: str = "--replay_text") -> list[tuple[str, str]]:
    """Every ``{"text": str}`` record of a JSONL file as ``(file:line, text)``; `source` (the flag
    that named the file) and the line are in every error."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"text file {path} does not exist ({source})")
    texts = []
    for where, record in _jsonl_records(path, source):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{where}: expected a {{"text": string}} record ({source})')
        if not record["text"].strip():
            raise DataError(f"{where}: the text is empty, so there is nothing to train on ({source})")
        texts.append((where, record["text"]))
    if not texts:
        raise DataError(f"{path}: no records (the file is empty) ({source})")
    return texts


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


def _tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    return repr(tokenizer.name_or_path or type(tokenizer).__name__)


def render(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation, add_generation_prompt: bool = False
) -> str:
    """The conversation as text, through the tokenizer's chat template or ``PLAIN_CHAT_TEMPLATE``."""
    template = None
    if not tokenizer.chat_template:
        if tokenizer.eos_token is None:
            raise TokenizerError(
                f"the tokenizer {_tokenizer_name(tokenizer)} has neither a chat template nor an eos token; "
                "the plain template needs eos to end responses (give the checkpoint a chat template)"
            )
        template = PLAIN_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Conversation) -> str:
    """The text a model continues to answer ``messages`` (which ends before the response)."""
    return render(tokenizer, messages, add_generation_prompt=True)


def response_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation, where: str = "a record"
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant response.

    A response's span runs from the end of the generation prompt that precedes it to the end of
    its turn, less trailing whitespace: the content plus the template's end-of-turn token, which
    the model must learn to emit. Works for any template that renders a conversation's first
    turns the same whether or not later turns follow (true of common templates). `where` (the
    record's file and line) prefixes the errors.
    """
    from jinja2 import TemplateError

    name = _tokenizer_name(tokenizer)
    try:
        text = render(tokenizer, messages)
    except TemplateError as error:
        roles = sorted({message["role"] for message in messages})
        raise TokenizerError(
            f"{where}: the chat template of {name} cannot render this conversation (roles {roles}): {error}"
        ) from None
    for index, message in enumerate(messages):
        if message["role"] == "tool" and message["content"].strip() not in text:
            raise TokenizerError(
                f"{where}: messages[{index}]: the chat template of {name} leaves out 'tool' messages, "
                "so the model would be trained without the tool output it answers from; use a template "
                "that renders the tool role, or drop tool turns"
            )
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_prompt(tokenizer, messages[:index])
        through = render(tokenizer, messages[: index + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise TokenizerError(
                f"{where}: the chat template of {name} renders turn {index} differently once later "
                "turns follow, so responses cannot be located for prompt masking"
            )
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: Conversation, max_length: int, where: str = "a record"
) -> Example:
    """``input_ids`` and ``labels`` (``IGNORE_INDEX`` outside responses), cut to ``max_length``.

    Tokens are assigned to responses by character offsets, so a token that straddles the
    prompt/response boundary is trained on: the model has to produce it to answer.
    """
    if not tokenizer.is_fast:
        raise TokenizerError(
            f"prompt masking needs a fast tokenizer (character offsets), {_tokenizer_name(tokenizer)} is "
            "a slow one: give the checkpoint a tokenizer.json (AutoTokenizer then loads the fast one)"
        )
    text, spans = response_spans(tokenizer, messages, where)
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
    """Tokenized examples as a list, dropping those with no response token within ``max_length``."""
    records = [(f"conversation {index}", messages) for index, messages in enumerate(conversations)]
    return list(tokenize_records(tokenizer, records, max_length))


def _tokenize_batch(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, list]:
    """``datasets.map`` function: a batch of (where, messages) rows → input_ids, labels, length."""
    examples = [
        tokenize_conversation(tokenizer, messages, max_length, where)
        for where, messages in zip(batch["where"], batch["messages"], strict=True)
    ]
    return {
        "input_ids": [example["input_ids"] for example in examples],
        "labels": [example["labels"] for example in examples],
        "length": [len(example["input_ids"]) for example in examples],
        "trained": [sum(label != IGNORE_INDEX for label in example["labels"]) for example in examples],
    }


def tokenize_records(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[tuple[str, Conversation]],
    max_length: int,
    num_proc: int = 1,
) -> Any:
    """``(where, conversation)`` records → a ``datasets.Dataset`` of ``input_ids``, ``labels`` and
    ``length``, tokenised by `num_proc` processes with a progress bar; records with no response
    token within ``max_length`` are dropped (a WARNING counts them; none left is an error)."""
    import datasets

    rows = datasets.Dataset.from_dict(
        {"where": [where for where, _ in records], "messages": [messages for _, messages in records]}
    )
    # Each process starts an interpreter and unpickles the tokenizer (seconds): worth it from
    # about RECORDS_PER_PROCESS records each.
    processes = min(num_proc, len(rows) // RECORDS_PER_PROCESS)
    logger.info("tokenising %d records with %d process(es)", len(rows), max(1, processes))
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "length": datasets.Value("int32"),
            "trained": datasets.Value("int32"),
        }
    )
    examples = rows.map(
        _tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=processes if processes > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        remove_columns=rows.column_names,
        features=features,
        desc="tokenising",
        # datasets would digest the tokenizer through dill for a cache of its own: slow, and unused
        # (rows built in memory; dsforget.data_cache keys and keeps the result)
        new_fingerprint=uuid.uuid4().hex,
    )
    kept = [index for index, trained in enumerate(examples["trained"]) if trained > 0]
    if not kept:
        raise DataError(
            f"no example has a response token within the first {max_length} tokens; "
            "raise DataConfig.max_length (--max_length)"
        )
    if len(kept) < len(examples):
        logger.warning(
            "%d of %d examples have no response token within max_length=%d and are dropped",
            len(examples) - len(kept),
            len(examples),
            max_length,
        )
        examples = examples.select(kept)
    return examples.remove_columns("trained")


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> Example:
    """A plain-text document as a language-modelling example: the tokenizer's encoding (with the
    bos it adds, as the lab's pretraining stream has) plus eos, cut to ``max_length``, with
    ``labels`` equal to ``input_ids`` (every token trained on)."""
    input_ids = list(tokenizer(text)["input_ids"])
    if tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
    input_ids = input_ids[:max_length]
    return {"input_ids": input_ids, "labels": list(input_ids)}


def _tokenize_text_batch(
    batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, list]:
    """``datasets.map`` function: a batch of (where, text) rows → input_ids, labels, length."""
    examples = [tokenize_text(tokenizer, text, max_length) for text in batch["text"]]
    return {
        "input_ids": [example["input_ids"] for example in examples],
        "labels": [example["labels"] for example in examples],
        "length": [len(example["input_ids"]) for example in examples],
    }


def tokenize_texts(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[tuple[str, str]], max_length: int, num_proc: int = 1
) -> Any:
    """``(where, text)`` records → a ``datasets.Dataset`` of ``input_ids``, ``labels`` (= input_ids)
    and ``length``, the columns ``tokenize_records`` gives, so both pack and batch alike."""
    import datasets

    rows = datasets.Dataset.from_dict(
        {"where": [where for where, _ in records], "text": [text for _, text in records]}
    )
    processes = min(num_proc, len(rows) // RECORDS_PER_PROCESS)
    logger.info("tokenising %d text records with %d process(es)", len(rows), max(1, processes))
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "length": datasets.Value("int32"),
        }
    )
    return rows.map(
        _tokenize_text_batch,
        batched=True,
        batch_size=256,
        num_proc=processes if processes > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length},
        remove_columns=rows.column_names,
        features=features,
        desc="tokenising text",
        new_fingerprint=uuid.uuid4().hex,
    )


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


def pack_ranges(lengths: Sequence[int], block_length: int) -> list[tuple[int, int]]:
    """Blocks of whole consecutive examples, as ``(first, end)`` index ranges: greedy in order, a
    new block starts when the next example would not fit in ``block_length`` tokens (examples are
    already cut to ``max_length`` = ``block_length``, so each fits alone)."""
    ranges, start, used = [], 0, 0
    for index, length in enumerate(lengths):
        if used + length > block_length and index > start:
            ranges.append((start, index))
            start, used = index, 0
        used += length
    if len(lengths) > start:
        ranges.append((start, len(lengths)))
    return ranges


def _merge(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> Example:
    """One packed block: the examples' tokens end to end, positions restarting at 0 for each, and
    each example's first label ignored (unpacked, the model never predicts an example's first
    token; packed, the previous example's last position would)."""
    block: Example = {"input_ids": [], "labels": [], "position_ids": []}
    for ids, example_labels in zip(input_ids, labels, strict=True):
        block["input_ids"].extend(ids)
        block["labels"].extend([IGNORE_INDEX, *example_labels[1:]])
        block["position_ids"].extend(range(len(ids)))
    return block


def pack_examples(examples: Sequence[Example], block_length: int) -> list[Example]:
    """Whole examples packed into blocks of at most ``block_length`` tokens (``pack_ranges``),
    with ``position_ids`` restarting per example (``_merge``).

    Collated by ``PaddingCollator`` (no attention mask, position ids kept) a block's examples do
    not attend to each other and the loss of a packed batch is the loss of its examples run one by
    one, over the same answer tokens.
    """
    lengths = [len(example["input_ids"]) for example in examples]
    return [
        _merge(
            [example["input_ids"] for example in examples[first:end]],
            [example["labels"] for example in examples[first:end]],
        )
        for first, end in pack_ranges(lengths, block_length)
    ]


def _pack_batch(batch: dict[str, list], examples: Any) -> dict[str, list]:
    """``datasets.map`` function: a batch of ``(first, end)`` ranges → packed blocks."""
    low, high = batch["first"][0], batch["end"][-1]
    rows = examples[low:high]  # one columnar read for the whole batch of blocks
    blocks = [
        _merge(rows["input_ids"][first - low : end - low], rows["labels"][first - low : end - low])
        for first, end in zip(batch["first"], batch["end"], strict=True)
    ]
    return {key: [block[key] for block in blocks] for key in PACKED_COLUMNS}


def pack_dataset(examples: Any, block_length: int) -> Any:
    """``pack_examples`` over a tokenised ``datasets.Dataset`` (from ``tokenize_records``), reading
    it a batch of blocks at a time; logs how full the blocks are."""
    import datasets

    lengths = examples["length"]
    ranges = pack_ranges(lengths, block_length)
    spans = datasets.Dataset.from_dict({"first": [r[0] for r in ranges], "end": [r[1] for r in ranges]})
    blocks = spans.map(
        _pack_batch,
        batched=True,
        batch_size=512,
        fn_kwargs={"examples": examples},
        remove_columns=spans.column_names,
        features=datasets.Features(
            {key: datasets.Sequence(datasets.Value("int32")) for key in PACKED_COLUMNS}
        ),
        desc="packing",
        new_fingerprint=uuid.uuid4().hex,
    )
    logger.info(
        "packing: %d examples into %d blocks of at most %d tokens (%.1f%% of their tokens used)",
        len(lengths),
        len(ranges),
        block_length,
        100 * sum(lengths) / max(1, len(ranges) * block_length),
    )
    return blocks


def unpack(block: Example) -> list[Example]:
    """The examples of a packed block (split where ``position_ids`` restart), for code that needs
    them one per row (CoFiTune's importance on training data)."""
    if "position_ids" not in block:
        return [block]
    starts = [index for index, position in enumerate(block["position_ids"]) if position == 0]
    return [
        {"input_ids": list(block["input_ids"][first:end]), "labels": list(block["labels"][first:end])}
        for first, end in zip(starts, [*starts[1:], len(block["input_ids"])], strict=True)
    ]


@dataclass(frozen=True)
class PaddingCollator:
    """Right-pads a list of examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors.

    Packed blocks (examples with ``position_ids``) get ``position_ids`` instead of an attention
    mask: transformers then builds a causal mask that keeps each packed example to itself
    (``masking_utils.find_packed_sequence_indices``; the padding is one more sequence, attending
    only to padding, with ignored labels). The model must be called with ``use_cache=False``: with
    a cache transformers skips that detection. ``flatten`` puts the whole micro-batch in one row
    with no padding at all, which flash_attention_2 needs to see the boundaries (it reads them
    from the position ids of a batch of one row only).
    """

    pad_token_id: int
    pad_to_multiple_of: int = 1
    flatten: bool = False

    @classmethod
    def for_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int = 1, flatten: bool = False
    ) -> PaddingCollator:
        """Pads with the pad token, or eos where there is none (padding is masked out either way)."""
        pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if pad_token_id is None:
            raise TokenizerError(
                f"the tokenizer {_tokenizer_name(tokenizer)} has neither a pad nor an eos token to pad with"
            )
        return cls(pad_token_id, pad_to_multiple_of, flatten)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        packed = "position_ids" in examples[0]
        if packed and self.flatten:
            merged = {
                key: [value for example in examples for value in example[key]] for key in PACKED_COLUMNS
            }
            return {key: torch.tensor([values], dtype=torch.long) for key, values in merged.items()}
        longest = max(len(example["input_ids"]) for example in examples)
        length = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        position_ids = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            size = len(example["input_ids"])
            input_ids[row, :size] = torch.tensor(example["input_ids"])
            labels[row, :size] = torch.tensor(example["labels"])
            attention_mask[row, :size] = 1
            if packed:
                position_ids[row, :size] = torch.tensor(example["position_ids"])
                position_ids[row, size:] = torch.arange(length - size)
        if packed:
            return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
