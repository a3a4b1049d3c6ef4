"""dsforget.data: records → conversations → masked tokens → batches, and its error messages."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from dsforget.data import (
    IGNORE_INDEX,
    PLAIN_CHAT_TEMPLATE,
    DataConfig,
    DataError,
    PaddingCollator,
    TokenizerError,
    load_conversations,
    pack_examples,
    pack_ranges,
    prepare_data,
    render,
    split_validation,
    to_conversation,
    tokenize_conversation,
    tokenize_conversations,
    unpack,
)
from dsforget.errors import UserInputError
from dsforget.lab.tokenizer import train_tokenizer

TEXTS = [
    "The capital of Zorbia is Velmor. The quick brown fox jumps over the lazy dog.",
    "Reverse the order of the words. red cat blue. Add the numbers 12 and 7.",
    "Hello there, how are you today? I am fine, thank you very much.",
] * 20

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Reverse: red cat blue"},
    {"role": "assistant", "content": "blue cat red"},
    {"role": "user", "content": "And: fox dog"},
    {"role": "assistant", "content": "dog fox"},
]


@pytest.fixture(scope="module")
def tokenizer():
    """The lab's tokenizer (byte-level BPE, bos/eos/pad, a chat template), trained in a second."""
    return train_tokenizer(TEXTS, vocab_size=400, model_max_length=256)


@pytest.fixture
def plain_tokenizer(tokenizer):
    """The same tokenizer as a base model would ship it: no chat template."""
    plain = train_tokenizer(TEXTS, vocab_size=400, model_max_length=256)
    plain.chat_template = None
    return plain


def labelled_runs(tokenizer, example) -> list[str]:
    """Decoded maximal runs of consecutive trained-on tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, "a label must be the token at its own position (HF shifts internally)"
            current.append(token)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- rendering and masking -----------------------------------------------------------------------


def test_chat_template_trains_on_every_assistant_turn_only(tokenizer):
    """Catches an off-by-one at the prompt/response boundary, a missed later turn, or a lost eos."""
    example = tokenize_conversation(tokenizer, CHAT, max_length=256)
    assert labelled_runs(tokenizer, example) == ["blue cat red</s>", "dog fox</s>"]
    prompt_tokens = [
        token for token, label in zip(example["input_ids"], example["labels"], strict=True) if label == -100
    ]
    assert tokenizer.decode(prompt_tokens) == (
        "<s><|system|>You are terse.<|user|>Reverse: red cat blue<|assistant|>"
        "<|user|>And: fox dog<|assistant|>"
    )
    # The template's bos appears once: the tokenizer must not add a second one.
    assert example["input_ids"].count(tokenizer.bos_token_id) == 1


CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_chatml_template_keeps_end_of_turn_and_drops_trailing_newline():
    """A Qwen-style template: no bos, an end-of-turn token that is not eos, a newline after it."""
    chatml = train_tokenizer(TEXTS, vocab_size=400, model_max_length=256)
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml.chat_template = CHATML_TEMPLATE
    example = tokenize_conversation(chatml, CHAT, max_length=256)
    assert labelled_runs(chatml, example) == ["blue cat red<|im_end|>", "dog fox<|im_end|>"]


def test_instruction_record_becomes_user_and_assistant_turns(tokenizer):
    with_input = to_conversation({"instruction": "Reverse.", "input": "red cat", "output": "cat red"}, "x")
    assert with_input == [
        {"role": "user", "content": "Reverse.\n\nred cat"},
        {"role": "assistant", "content": "cat red"},
    ]
    without_input = to_conversation({"instruction": "Say hi.", "input": None, "output": "hi"}, "x")
    assert without_input[0] == {"role": "user", "content": "Say hi."}
    example = tokenize_conversation(tokenizer, with_input, max_length=256)
    assert labelled_runs(tokenizer, example) == ["cat red</s>"]


def test_plain_fallback_template_when_the_tokenizer_has_none(plain_tokenizer):
    """Catches base-model tokenizers (no chat template) failing, or their format drifting from the docs."""
    conversation = [
        {"role": "user", "content": "Reverse: red cat"},
        {"role": "assistant", "content": "cat red"},
    ]
    assert (
        render(plain_tokenizer, conversation)
        == "<s>### User:\nReverse: red cat\n\n### Assistant:\ncat red</s>\n\n"
    )
    assert render(plain_tokenizer, conversation[:1], add_generation_prompt=True) == (
        "<s>### User:\nReverse: red cat\n\n### Assistant:\n"
    )
    example = tokenize_conversation(plain_tokenizer, conversation, max_length=256)
    assert labelled_runs(plain_tokenizer, example) == ["cat red</s>"]
    assert PLAIN_CHAT_TEMPLATE not in (plain_tokenizer.chat_template or "")  # rendering must not mutate it


def test_template_that_rerenders_earlier_turns_is_refused(tokenizer):
    """A template that changes earlier turns once later ones follow would silently mislabel spans."""
    tokenizer = train_tokenizer(TEXTS, vocab_size=400, model_max_length=256)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %}{{ eos_token }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="renders turn 2 differently"):
        tokenize_conversation(tokenizer, CHAT, max_length=256)


def test_truncation_cuts_and_drops_examples_without_a_response_token(tokenizer, caplog):
    long_prompt = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    cut = tokenize_conversation(tokenizer, short, max_length=6)
    assert len(cut["input_ids"]) == len(cut["labels"]) == 6
    with caplog.at_level(logging.WARNING, logger="dsforget.data"):
        kept = tokenize_conversations(tokenizer, [long_prompt, short], max_length=20)
    assert len(kept) == 1 and "1 of 2 examples" in caplog.text
    with pytest.raises(DataError, match="max_length"):
        tokenize_conversations(tokenizer, [long_prompt], max_length=20)


# --- the tool role -------------------------------------------------------------------------------

TOOL_TEXTS = ["Call the weather tool for Paris. It is sunny, 21 degrees. The answer is sunny."] * 30
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "weather(Paris)"},
    {"role": "tool", "content": "sunny, 21"},
    {"role": "assistant", "content": "It is sunny."},
]


@pytest.fixture(scope="module")
def chatml():
    tokenizer = train_tokenizer(TOOL_TEXTS, vocab_size=300, model_max_length=256)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def trained_text(tokenizer, example: dict) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label >= 0]
    )


def test_tool_turns_are_context_and_assistant_turns_are_trained(chatml, tmp_path: Path) -> None:
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": TOOL_CHAT}) + "\n")
    data = prepare_data(DataConfig(str(path)), chatml)
    assert trained_text(chatml, data.train[0]) == "weather(Paris)<|im_end|>It is sunny.<|im_end|>"
    assert "sunny, 21" in chatml.decode(data.train[0]["input_ids"])


def test_a_template_without_the_tool_role_is_named_with_the_record(chatml, tmp_path: Path) -> None:
    """The lab's template raises on unknown roles; another silently drops tool turns: both must be
    a UserInputError naming the file and line, not a jinja traceback or a model trained blind."""
    path = tmp_path / "tools.jsonl"
    path.write_text(
        json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"messages": TOOL_CHAT}) + "\n"
    )
    raising = train_tokenizer(TOOL_TEXTS, vocab_size=300, model_max_length=256)  # the lab's template
    with pytest.raises(TokenizerError, match=rf"{path}:2: the chat template of .* cannot render") as error:
        prepare_data(DataConfig(str(path)), raising)
    assert isinstance(error.value, UserInputError)
    chatml.chat_template = CHATML_TEMPLATE.replace(
        "{% for m in messages %}", "{% for m in messages if m['role'] != 'tool' %}"
    )
    try:
        with pytest.raises(TokenizerError, match=rf"{path}:2: messages\[2\]: .* leaves out 'tool' messages"):
            prepare_data(DataConfig(str(path)), chatml)
    finally:
        chatml.chat_template = CHATML_TEMPLATE


def test_tokenizer_errors_are_user_errors(chatml) -> None:
    """Before issue 16 these were plain ValueErrors: a traceback on every rank instead of one line."""
    chatml.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %}{{ eos_token }}{% endif %}{% endfor %}"
    )
    try:
        with pytest.raises(TokenizerError, match=r"^data.jsonl:7: the chat template of .* renders turn 1"):
            tokenize_conversation(
                chatml, TOOL_CHAT[:2] + [{"role": "user", "content": "x"}], 64, "data.jsonl:7"
            )
    finally:
        chatml.chat_template = CHATML_TEMPLATE
    with pytest.raises(TokenizerError, match="neither a pad nor an eos token"):
        PaddingCollator.for_tokenizer(
            type("Bare", (), {"pad_token_id": None, "eos_token_id": None, "name_or_path": "x"})()
        )


# --- batching ------------------------------------------------------------------------------------


def test_packing_keeps_whole_examples_with_their_own_positions(tokenizer):
    """Catches labels shifted against tokens, an example cut across two blocks, positions that do
    not restart per example, and a first label left for the previous example to predict."""
    conversations = [
        [
            {"role": "user", "content": f"Reverse: {'red cat ' * n}"},
            {"role": "assistant", "content": "fox " * n},
        ]
        for n in range(1, 8)
    ]
    examples = tokenize_conversations(tokenizer, conversations, max_length=256)
    lengths = [len(example["input_ids"]) for example in examples]
    block_length = max(lengths) + 4
    blocks = pack_examples(examples, block_length)
    assert 1 < len(blocks) < len(examples)
    assert all(len(block["input_ids"]) <= block_length for block in blocks)
    unpacked = [example for block in blocks for example in unpack(block)]
    assert [example["input_ids"] for example in unpacked] == [example["input_ids"] for example in examples]
    for block in blocks:
        starts = [i for i, position in enumerate(block["position_ids"]) if position == 0]
        assert all(block["labels"][start] == IGNORE_INDEX for start in starts)
        sizes = [len(example["input_ids"]) for example in unpack(block)]
        assert block["position_ids"] == [position for size in sizes for position in range(size)]
    # every trained token is still trained, on its own token
    assert sum(label != IGNORE_INDEX for block in blocks for label in block["labels"]) == sum(
        label != IGNORE_INDEX for example in examples for label in example["labels"][1:]
    )
    assert pack_ranges([3, 3, 3, 5, 1], 6) == [(0, 2), (2, 3), (3, 5)]


def test_padding_collator_masks_padding():
    batch = PaddingCollator(pad_token_id=0, pad_to_multiple_of=4)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_validation_split_is_deterministic_and_disjoint():
    items = list(range(100))
    train, validation = split_validation(items, 0.2, seed=7)
    assert (train, validation) == split_validation(items, 0.2, seed=7)
    assert len(validation) == 20 and sorted(train + validation) == items
    assert set(train).isdisjoint(validation)
    assert split_validation(items, 0.2, seed=8)[1] != validation
    assert split_validation(items[:3], 0.01, seed=0)[1] != []  # a requested split is never empty
    with pytest.raises(DataError, match="validation_fraction"):
        split_validation(items[:1], 0.5, seed=0)


# --- loading and errors --------------------------------------------------------------------------

GOOD = json.dumps({"instruction": "Reverse.", "input": "red cat", "output": "cat red"})


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"instruction": "x", "output": ', "invalid JSON"),
        ('{"instruction": "x"}', "missing key(s) ['output']"),
        ('{"instruction": "x", "output": 3}', "'output' must be a string"),
        ('["instruction", "output"]', "expected a JSON object, got list"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "messages[0]: role must be one of"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}',
            "is empty",
        ),
        ('{"messages": "hello"}', "'messages' must be a non-empty list"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, bad_line, message):
    """Line 4 after a blank line: catches line numbers that skip blanks or count from zero."""
    path = write_lines(tmp_path / "train.jsonl", [GOOD, "", GOOD, bad_line, GOOD])
    with pytest.raises(DataError) as error:
        load_conversations(path)
    assert f"{path}:4:" in str(error.value)
    assert message in str(error.value)


def test_empty_or_missing_files_are_named(tmp_path):
    for content in ["", "\n\n"]:
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        with pytest.raises(DataError, match=rf"{path}: no records"):
            load_conversations(path)
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        load_conversations(tmp_path / "nothere.jsonl")


def test_csv_and_json_load_through_datasets(tmp_path, tokenizer):
    csv = tmp_path / "train.csv"
    csv.write_text('instruction,input,output\nReverse.,red cat,cat red\n"Say hi.",,hi\n')
    assert load_conversations(csv) == [
        to_conversation({"instruction": "Reverse.", "input": "red cat", "output": "cat red"}, "x"),
        to_conversation({"instruction": "Say hi.", "output": "hi"}, "x"),
    ]
    array = tmp_path / "train.json"
    array.write_text(json.dumps([{"messages": CHAT}, {"instruction": "Say hi.", "output": "hi"}]))
    assert load_conversations(array)[0] == CHAT
    data = prepare_data(DataConfig(str(array)), tokenizer)
    assert [labelled_runs(tokenizer, example) for example in data.train] == [
        ["blue cat red</s>", "dog fox</s>"],
        ["hi</s>"],
    ]
    broken = tmp_path / "broken.csv"
    broken.write_text("instruction,answer\nx,y\n")
    with pytest.raises(DataError, match=rf"{broken}: record 1: missing key\(s\) \['output'\]"):
        load_conversations(broken)


def test_prepare_data_splits_then_packs(tmp_path, tokenizer):
    records = [
        {"instruction": "Reverse.", "input": f"red cat {i}", "output": f"{i} cat red"} for i in range(40)
    ]
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(record) for record in records])
    config = DataConfig(str(path), max_length=32, packing=True, validation_fraction=0.25, seed=3)
    data = prepare_data(config, tokenizer)
    assert len(data.validation) == 10
    assert all(len(block["input_ids"]) <= 32 for block in data.train)
    trained_tokens = sum(label != IGNORE_INDEX for block in data.train for label in block["labels"])
    assert 0 < trained_tokens
    # Validation examples stay whole: each decodes to one response.
    assert all(len(labelled_runs(tokenizer, example)) == 1 for example in data.validation)
    again = prepare_data(config, tokenizer)
    assert again.train.to_list() == data.train.to_list()
    assert again.validation.to_list() == data.validation.to_list()


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"path": "x.jsonl", "max_length": 1}, "DataConfig.max_length"),
        ({"path": "x.jsonl", "validation_fraction": 1.0}, "DataConfig.validation_fraction"),
        ({"path": "x.jsonl", "format": "xml"}, "DataConfig.format"),
        ({"path": "x.txt"}, "DataConfig.format"),
        ({"path": ""}, "DataConfig.path"),
        ({"path": "x.jsonl", "packing": "yes"}, "DataConfig.packing"),
        ({"path": "x.jsonl", "seed": 1.5}, "DataConfig.seed"),
        ({"path": "x.jsonl", "max_lenght": 8}, "max_lenght"),
    ],
)
def test_data_config_errors_name_the_key(values, key):
    with pytest.raises(ValueError, match=key):
        DataConfig.from_dict(values)


def test_data_config_infers_or_takes_the_format():
    assert DataConfig("a/b.parquet").file_format == "parquet"
    assert DataConfig("a/b.txt", format="jsonl").file_format == "jsonl"
