"""Data at scale: packing that keeps examples apart, and the tokenisation cache."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest
import torch
from tiny import VOCAB, tiny_llama_config
from transformers import LlamaForCausalLM

from dsforget import data as data_module
from dsforget.data import (
    IGNORE_INDEX,
    DataConfig,
    PaddingCollator,
    pack_examples,
    prepare_data,
)
from dsforget.data_cache import CacheWaitError, cache_key, prepare_cached
from dsforget.lab.tokenizer import train_tokenizer

# --- packing -------------------------------------------------------------------------------------


def random_examples(count: int, seed: int) -> list[dict]:
    """Examples of 5-17 tokens whose first 2-4 labels are ignored (a prompt), the rest trained."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        length = int(torch.randint(5, 18, (1,), generator=generator))
        prompt = int(torch.randint(2, 5, (1,), generator=generator))
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def summed_loss(model: LlamaForCausalLM, batch: dict[str, torch.Tensor], **kwargs) -> tuple[float, int]:
    """(loss summed over the batch's targets, number of targets) under transformers' own loss."""
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        loss = model(**batch, **kwargs).loss
    return float(loss) * targets, targets


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_batch_has_the_loss_of_its_examples_one_by_one(attention: str) -> None:
    """Catches packed examples attending to each other, positions that run on across examples and
    an example's first token predicted from the one before it: each would change the summed loss.
    The blocks collated as the packing before issue 16 did (concatenated, one attention mask of
    ones, positions 0..n-1) must fail the same comparison, and so must the packed batch run with
    a cache (transformers then ignores the position ids' boundaries: why the trainer passes
    use_cache=False)."""
    torch.manual_seed(0)
    # large weights: attention far from uniform, so context matters and leaks show
    config = tiny_llama_config(attn_implementation=attention, initializer_range=0.3)
    model = LlamaForCausalLM(config).double().eval()
    examples = random_examples(11, seed=1)
    collate = PaddingCollator(pad_token_id=0)
    want, want_targets = 0.0, 0
    for example in examples:
        loss, targets = summed_loss(model, collate([example]), use_cache=False)
        want, want_targets = want + loss, want_targets + targets

    blocks = pack_examples(examples, block_length=40)
    assert len(blocks) < len(examples) and any(len(b["input_ids"]) < 40 for b in blocks)  # padding too
    got, targets = summed_loss(model, collate(blocks), use_cache=False)
    assert targets == want_targets
    # transformers computes the loss in float32 (it upcasts logits to float, here a downcast)
    assert got == pytest.approx(want, rel=1e-6)
    flat = PaddingCollator(pad_token_id=0, flatten=True)(blocks)  # what flash_attention_2 gets
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    assert summed_loss(model, flat, use_cache=False)[0] == pytest.approx(want, rel=1e-6)

    old_style = PaddingCollator(pad_token_id=0)(
        [{key: b[key] for key in ("input_ids", "labels")} for b in blocks]
    )
    assert summed_loss(model, old_style, use_cache=False)[0] != pytest.approx(want, rel=1e-3)
    assert summed_loss(model, collate(blocks))[0] != pytest.approx(want, rel=1e-3)  # a cache: no detection


def test_packed_training_gradients_equal_unpacked() -> None:
    """The gradient of a packed micro-batch equals that of the same examples padded one per row,
    weighted alike (transformers' loss is a mean over the batch's targets in both)."""
    torch.manual_seed(0)
    packed_model = LlamaForCausalLM(tiny_llama_config()).double()
    padded_model = LlamaForCausalLM(tiny_llama_config()).double()
    padded_model.load_state_dict(packed_model.state_dict())
    examples = random_examples(7, seed=2)
    collate = PaddingCollator(pad_token_id=0)
    packed_model(**collate(pack_examples(examples, 48)), use_cache=False).loss.backward()
    # unpacked, an example's first label is never a target anyway: the same target set
    padded_model(**collate(examples), use_cache=False).loss.backward()
    for (name, packed), padded in zip(
        packed_model.named_parameters(), padded_model.parameters(), strict=True
    ):
        torch.testing.assert_close(packed.grad, padded.grad, rtol=1e-9, atol=1e-12, msg=name)


# --- the cache -----------------------------------------------------------------------------------


@pytest.fixture
def records(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    lines = [json.dumps({"instruction": f"Say {i} twice.", "output": f"{i} {i}"}) for i in range(60)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def lab_tokenizer():
    return train_tokenizer(["Say 1 twice. 1 1 2 2 3 3 4 4 5 5"] * 20, vocab_size=300, model_max_length=256)


def counting(monkeypatch) -> list[int]:
    """Counts tokenize_conversation calls (in-process tokenisation, num_proc=1)."""
    calls = [0]
    real = data_module.tokenize_conversation

    def tokenize(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(data_module, "tokenize_conversation", tokenize)
    return calls


def test_cache_is_reused_and_invalidated_by_what_the_tokens_depend_on(
    tmp_path: Path, records: Path, lab_tokenizer, monkeypatch
) -> None:
    """Catches a cache that tokenises again (wasted hours at scale) or, worse, serves stale tokens
    after the tokenizer, its chat template, max_length, packing or the data's content changed."""
    calls = counting(monkeypatch)
    cache = tmp_path / "cache"
    config = DataConfig(str(records), max_length=32, validation_fraction=0.1)
    first, key = prepare_cached(config, lab_tokenizer, cache)
    assert calls[0] == 60 and (cache / key / "meta.json").exists()
    again, same_key = prepare_cached(config, lab_tokenizer, cache)
    assert calls[0] == 60 and same_key == key  # read back, not tokenised
    assert (
        again.train.to_list() == first.train.to_list() == prepare_data(config, lab_tokenizer).train.to_list()
    )
    assert len(again.validation) == 6

    keys = {key}
    for changed in (
        DataConfig(str(records), max_length=24, validation_fraction=0.1),
        DataConfig(str(records), max_length=32, validation_fraction=0.1, packing=True),
        DataConfig(str(records), max_length=32, validation_fraction=0.2),
    ):
        keys.add(prepare_cached(changed, lab_tokenizer, cache)[1])
    other_tokenizer = train_tokenizer(["Say 1 twice. 1 1 2 2"] * 20, vocab_size=290, model_max_length=256)
    keys.add(prepare_cached(config, other_tokenizer, cache)[1])
    lab_tokenizer.chat_template = lab_tokenizer.chat_template.replace(
        "{{ bos_token }}", "{{ bos_token * 2 }}"
    )
    keys.add(prepare_cached(config, lab_tokenizer, cache)[1])
    # the same size and mtime, other content: path+size+mtime would serve the old tokens
    stat = records.stat()
    records.write_text(records.read_text().replace("Say 5 ", "Say 6 "))
    os.utime(records, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert records.stat().st_size == stat.st_size
    keys.add(prepare_cached(config, lab_tokenizer, cache)[1])
    assert len(keys) == 7 and calls[0] == 60 * 8  # 7 entries and the uncached prepare_data above
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == sorted(keys)


def test_multiprocess_tokenisation_equals_one_process(tmp_path: Path, lab_tokenizer) -> None:
    """datasets.map with 2 processes (the tokenizer pickled into each): same rows, same order."""
    path = tmp_path / "many.jsonl"
    path.write_text(
        "".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i}"}) + "\n" for i in range(2400))
    )
    config = DataConfig(str(path), max_length=24, packing=True)
    one = prepare_data(config, lab_tokenizer, num_proc=1)
    two = prepare_data(config, lab_tokenizer, num_proc=2)
    assert two.train.to_list() == one.train.to_list() and len(one.train) > 100


def test_waiting_for_another_writer_is_bounded(tmp_path: Path, records: Path, lab_tokenizer) -> None:
    config = DataConfig(str(records), max_length=32)
    cache = tmp_path / "cache"
    cache.mkdir()
    key, _ = cache_key(config, lab_tokenizer)
    with open(cache / f"{key}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(
            CacheWaitError, match=rf"gave up after 1 s .*{key}.lock is locked.*--data_timeout_s"
        ):
            prepare_cached(config, lab_tokenizer, cache, timeout_s=1)
    assert not (cache / key).exists()
    prepare_cached(config, lab_tokenizer, cache, timeout_s=1)  # released: it builds
    assert (cache / key / "train").is_dir()
