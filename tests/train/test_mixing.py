"""Several --data files mixed by weight and --replay_text replay: the seeded stream, replay's
tokens, and bad input (in-process, no ranks)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from dsforget.data import IGNORE_INDEX, DataConfig, DataError, load_texts, prepare_data, tokenize_text
from dsforget.errors import ConfigError, InputFileError
from dsforget.mixing import REPLAY, TASK, ConcatExamples, Mixture, build_mixture, parse_data_spec, rank_share
from dsforget.train.inputs import resolve_inputs
from dsforget.train.run_config import RunConfig, parse_run_config
from dsforget.train.trainer import steps_per_epoch

# Three task-like sources and replay, rows of very different sizes (a small source cycles).
SIZES = [("a.jsonl", 0.6, 700), ("b.jsonl", 0.3, 90), ("c.jsonl", 0.1, 2000)]


def mixture(seed: int = 0, ratio: float = 0.2) -> Mixture:
    return build_mixture(SIZES, ("general.jsonl", 5000), ratio, seed)


def write(path: Path, lines: list[object]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_shares_follow_the_weights_and_the_replay_ratio() -> None:
    """Over 12 epochs (~41,000 slots) every source's realised share is within 0.01 of (1 - ratio)
    * weight / sum(weights), replay's within 0.01 of the ratio (3 standard deviations at these
    counts are below 0.007). Catches weights that are not normalised, a ratio applied to the
    task files instead of the stream, or a draw that ignores its probabilities."""
    mix = mixture()
    assert [source.kind for source in mix.sources] == [TASK, TASK, TASK, REPLAY]
    assert mix.epoch_size == round(2790 / 0.8)
    described = mix.describe(slots=12 * mix.epoch_size, slots_per_epoch=mix.epoch_size)
    assert described["replay_ratio"] == 0.2 and described["unit"] == "example"
    expected = [0.8 * 0.6, 0.8 * 0.3, 0.8 * 0.1, 0.2]
    for source, share in zip(described["sources"], expected, strict=True):
        assert source["expected_share"] == pytest.approx(share)
        assert abs(source["realised_share"] - share) < 0.01, source
    assert sum(source["drawn"] for source in described["sources"]) == 12 * mix.epoch_size
    # a run of 2.5 epochs that trains 3,000 slots of each: the dropped tails are not counted
    first = mix.epoch_sources(0)[:3000].tolist() + mix.epoch_sources(1)[:3000].tolist()
    first += mix.epoch_sources(2)[:1500].tolist()
    assert mix.drawn(7500, 3000) == [first.count(index) for index in range(4)]


def test_each_source_is_read_whole_before_it_repeats_and_rows_stay_in_their_source() -> None:
    """b (90 rows, 24% of ~3,500 slots) is used up several times an epoch: every pass holds each
    of its rows once. Catches sampling with replacement within a source, and offsets that send a
    slot of one source to another source's rows."""
    mix = mixture()
    sources = mix.epoch_sources(0).tolist()
    order = mix.epoch_order(0)
    low, high = mix.offsets[1], mix.offsets[2]
    rows_of_b = [row for row, source in zip(order, sources, strict=True) if source == 1]
    assert all(low <= row < high for row in rows_of_b)
    for start in range(0, len(rows_of_b) - 90 + 1, 90):
        assert sorted(rows_of_b[start : start + 90]) == list(range(low, high))
    for index, source in enumerate(sources):
        assert mix.offsets[source] <= order[index] < mix.offsets[source + 1]


def test_stream_is_a_function_of_seed_and_epoch_alone() -> None:
    """What an exact resume needs: a fresh Mixture (a resumed run's) gives epoch 3 exactly as one
    that went through epochs 0-2 first (the sources' cursors are recomputed, not remembered);
    another seed gives another stream."""
    walked = mixture()
    for epoch in range(3):
        walked.epoch_order(epoch)
    assert mixture().epoch_order(3) == walked.epoch_order(3)
    assert mixture().epoch_order(0) != mixture().epoch_order(1)
    assert mixture(seed=1).epoch_order(0) != mixture().epoch_order(0)


def test_ranks_split_the_stream_so_a_global_batch_is_the_same_at_any_world_size() -> None:
    """As DistributedSampler: one rank with micro-batch 8 and two ranks with micro-batch 4 train
    the same examples in each optimizer step, and no slot goes to two ranks."""
    stream = mixture().epoch_order(0)
    one = rank_share(stream, 0, 1)
    two = [rank_share(stream, rank, 2) for rank in range(2)]
    slots = [rank_share(range(len(stream)), rank, 2) for rank in range(2)]
    assert not set(slots[0]) & set(slots[1]) and sorted(slots[0] + slots[1]) == list(
        range(len(stream) // 2 * 2)
    )
    assert Counter(two[0] + two[1]) == Counter(one[: len(two[0]) * 2])
    for step in range(20):
        global_batch = two[0][step * 4 : step * 4 + 4] + two[1][step * 4 : step * 4 + 4]
        assert sorted(global_batch) == sorted(one[step * 8 : step * 8 + 8])


def test_concatenated_examples_index_across_parts() -> None:
    examples = ConcatExamples([[{"i": 0}, {"i": 1}], [], [{"i": 2}]])
    assert len(examples) == 3 and [examples[i]["i"] for i in range(3)] == [0, 1, 2]
    with pytest.raises(IndexError):
        examples[3]


def test_replay_examples_carry_labels_on_every_token(tmp_path: Path, tiny_model: Path) -> None:
    """A replay document is language modelling: labels equal the input ids everywhere (no
    IGNORE_INDEX), eos closes it, and held-out texts are left out of the file's examples."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    example = tokenize_text(tokenizer, "the cat sat on the mat", max_length=64)
    assert example["labels"] == example["input_ids"] and example["input_ids"][-1] == tokenizer.eos_token_id
    texts = ["the cat sat", "a dog ran far away", "the mat", "held out words"]
    path = write(tmp_path / "general.jsonl", [{"text": text} for text in texts])
    config = DataConfig(path, max_length=64, text=True, exclude_texts=frozenset({"held out words"}))
    data = prepare_data(config, tokenizer)
    assert len(data.train) == 3 and len(data.validation) == 0
    for row in data.train:
        assert row["labels"] == row["input_ids"] and IGNORE_INDEX not in row["labels"]
    packed = prepare_data(DataConfig(path, max_length=64, text=True, packing=True), tokenizer)
    assert len(packed.train) == 1  # every document fits one block; only each first label is ignored
    assert packed.train[0]["labels"].count(IGNORE_INDEX) == 4


def test_one_data_path_takes_the_plain_pipeline(tmp_path: Path, tiny_model: Path) -> None:
    """A single --data path (with or without a weight) and no replay resolves to no mixture:
    batches come from DistributedSampler over that file, as before mixing existed."""
    data = write(tmp_path / "sft.jsonl", [{"instruction": "a", "output": "b"}])
    for spec in (str(data), f"{data}:0.5"):
        inputs = resolve_inputs(RunConfig(model=str(tiny_model), data=spec))
        assert inputs.train_file == data and inputs.train_files == () and inputs.replay is None
    other = write(tmp_path / "other.jsonl", [{"instruction": "c", "output": "d"}])
    mixed = resolve_inputs(RunConfig(model=str(tiny_model), data=f"{data}:3,{other}"))
    assert mixed.train_files == ((data, 3.0), (other, 1.0))


def test_an_existing_path_is_one_file_and_a_weight_follows_the_last_colon(tmp_path: Path) -> None:
    """A value naming a file is that file even with a comma or colon in its name; in a mix the
    weight is what follows an entry's last colon, so colons in paths stay unambiguous."""
    record = [{"instruction": "a", "output": "b"}]
    comma = write(tmp_path / "x,y:2.jsonl", record)
    assert parse_data_spec(str(comma)) == [(str(comma), 1.0)]
    colon, plain = write(tmp_path / "y:2.jsonl", record), write(tmp_path / "p.jsonl", record)
    assert parse_data_spec(f"{colon}:0.25,{plain}") == [(str(colon), 0.25), (str(plain), 1.0)]


def _files(tmp: Path) -> tuple[Path, Path]:
    record = [{"instruction": "a", "output": "b"}]
    return write(tmp / "a.jsonl", record), write(tmp / "b.jsonl", record)


spec, flags, Run, Missing = parse_data_spec, parse_run_config, RunConfig, InputFileError


def user(model: Path, data: Path) -> dict:
    """A run on a checkpoint directory (no lab corpus to replay)."""
    return {"model": str(model), "data": str(data)}


BAD = [  # (call(tmp, a, b), error, message)
    (lambda t, a, b: spec(f"{a}:0.7,{b}:x"), ConfigError, r"--data entry .*b\.jsonl:x'.*'x'"),
    (lambda t, a, b: spec(f"{a}:0,{b}"), ConfigError, r"a\.jsonl:0'.*finite number > 0"),
    (lambda t, a, b: spec(f"{a}:-1,{b}"), ConfigError, "finite number > 0"),
    (lambda t, a, b: spec(f"{a}:nan,{b}"), ConfigError, "finite number > 0"),
    (lambda t, a, b: spec(f"{a},{a}:2"), ConfigError, "named twice"),
    (lambda t, a, b: spec(f"{a},{t}/no.jsonl:1"), Missing, r"no\.jsonl does not exist \(--data entry"),
    (lambda t, a, b: spec(f"{t}/no.jsonl"), Missing, r"no\.jsonl does not exist \(--data\)"),
    (lambda t, a, b: spec(f"{t}/no:file.jsonl"), Missing, r"no:file\.jsonl does not exist \(--data\)"),
    (lambda t, a, b: flags(["--replay_ratio", "1"]), ConfigError, r"replay_ratio=1\.0 must be .* \[0, 1\)"),
    (lambda t, a, b: flags(["--replay_ratio", "-0.1"]), ConfigError, "replay_ratio=-0.1"),
    (lambda t, a, b: flags(["--replay_text", str(a)]), ConfigError, "replay_ratio is 0"),
    (lambda t, a, b: Run(**user(t, a), replay_ratio=0.1), ConfigError, "needs --replay_text"),
    (lambda t, a, b: Run(**user(t, a), replay_ratio=0.2, replay_text="lab"), ConfigError, "model 'lab'"),
    (lambda t, a, b: Run(replay_ratio=0.1, replay_text=str(a), general_text=str(a)), ConfigError, "forget"),
    (lambda t, a, b: load_texts(a), DataError, r'a\.jsonl:1: expected a \{"text": string\} record'),
    (lambda t, a, b: steps_per_epoch(12, 8, 2, 1, mixed=True), ConfigError, r"epoch of the mixed data .* 12"),
    (lambda t, a, b: load_texts(t / "no.jsonl"), Missing, r"no\.jsonl does not exist \(--replay_text\)"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "message"), BAD)
def test_bad_mixing_input_is_named(tmp_path: Path, call, error, message) -> None:
    """Each bad weight, file or ratio is one user error naming its flag and entry or file."""
    a, b = _files(tmp_path)
    with pytest.raises(error, match=message):
        call(tmp_path, a, b)


def test_a_missing_replay_file_is_named_by_its_flag(tmp_path: Path, tiny_model: Path) -> None:
    a, _ = _files(tmp_path)
    config = RunConfig(
        model=str(tiny_model), data=str(a), replay_ratio=0.1, replay_text=str(tmp_path / "no.jsonl")
    )
    with pytest.raises(
        InputFileError, match=r"replay text file .*no\.jsonl does not exist \(--replay_text\)"
    ):
        resolve_inputs(config)
