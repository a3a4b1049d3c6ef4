"""CoFiTune unit importance (dsforget.methods.cofitune.importance) against a brute-force reference,
and its artifact.

The reference re-implements the masked model with explicit mask nn.Parameters (no hooks) and the
documented per-sequence dropout contract, and back-propagates the KL loss of both passes at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from launcher import REPO, run_ranks
from tiny import VOCAB, TinyLM, initial_state
from torch import nn

from dsforget.methods.cofitune.importance import (
    UnitImportance,
    UnsupportedModelError,
    compute_importance,
    mask_gradients,
    normalise,
    sequence_seed,
)

WORKER = str(REPO / "tests" / "workers" / "importance_worker.py")


def tiny_llama() -> nn.Module:
    """TinyLM's Llama (hidden 56, 4 heads of 14, 2 kv heads, intermediate 98), fixed weights."""
    model = TinyLM()
    model.load_state_dict(initial_state())
    return model.llama


def random_batches(count: int, rows: int, length: int, seed: int, pad_right: bool = True) -> list[dict]:
    """Random tokens (never 0 at real positions), random real lengths >= 3, padding with id 0."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, VOCAB, (rows, length), generator=generator)
        lengths = torch.randint(3, length + 1, (rows,), generator=generator)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        if not pad_right:
            mask = mask.flip(-1)
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches


def assert_close_relative(got: dict, want: dict, rtol: float) -> None:
    for kind, expected in want.items():
        scale = float(expected.abs().max())
        assert scale > 0, f"{kind}: the reference gradient is all zero, the comparison would prove nothing"
        diff = (got[kind] - expected).abs()
        bad = diff > rtol * scale
        assert not bad.any(), (
            f"{kind}: {int(bad.sum())} of {diff.numel()} differ (max {float(diff.max()):.3g}, "
            f"scale {scale:.3g}); first: got {got[kind][bad][:4].tolist()} want {expected[bad][:4].tolist()}"
        )


# ----------------------------------------------------------------------------- brute-force reference


def reference_mask_gradients(
    model: nn.Module, batches: list[dict], dropout: float, seed: int, absolute: bool
) -> dict[str, torch.Tensor]:
    """Explicit mask parameters written into re-implemented o_proj / MLP forwards; dropout masks
    drawn as documented (per sequence, real positions, pass-major then layer order)."""
    config = model.config
    layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = config.hidden_size // n_heads
    masks = {
        "heads": nn.Parameter(torch.ones(layers, n_heads)),
        "intermediate": nn.Parameter(torch.ones(layers, config.intermediate_size)),
        "hidden": nn.Parameter(torch.ones(layers, config.hidden_size)),
    }
    totals = {kind: torch.zeros_like(mask, dtype=torch.float64) for kind, mask in masks.items()}
    scales: list[torch.Tensor] = []  # one [B, T, H] dropout scale per (pass, layer), consumed in order
    patched = []

    def masked_o_proj(x, o_proj, index):
        return F.linear(x * masks["heads"][index].repeat_interleave(head_dim), o_proj.weight)

    def masked_mlp(x, mlp, index):
        up = F.linear(x, mlp.up_proj.weight) * masks["intermediate"][index]
        return (
            F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * up, mlp.down_proj.weight)
            * masks["hidden"][index]
        )

    def dropped_layer(*args, forward, **kwargs):
        return forward(*args, **kwargs) * scales.pop(0)

    for index, layer in enumerate(model.model.layers):
        o_proj, mlp = layer.self_attn.o_proj, layer.mlp
        o_proj.forward = lambda x, o_proj=o_proj, index=index: masked_o_proj(x, o_proj, index)
        mlp.forward = lambda x, mlp=mlp, index=index: masked_mlp(x, mlp, index)
        layer.forward = lambda *a, forward=layer.forward, **k: dropped_layer(*a, forward=forward, **k)
        patched += [o_proj, mlp, layer]
    model.train()
    for param in model.parameters():
        param.requires_grad_(False)
    tokens = 0
    try:
        for batch in batches:
            ids, attention = batch["input_ids"], batch["attention_mask"]
            rows, length = ids.shape
            draws = [[None] * rows for _ in range(2 * layers)]
            for row in range(rows):
                real = attention[row].nonzero().squeeze(-1)
                generator = torch.Generator().manual_seed(sequence_seed(seed, ids[row, real]))
                for step in range(2 * layers):
                    scale = torch.ones(length, config.hidden_size)
                    keep = torch.rand(len(real), config.hidden_size, generator=generator) >= dropout
                    scale[real] = keep.float() / (1 - dropout)
                    draws[step][row] = scale
            scales[:] = [torch.stack(step) for step in draws]
            z1 = model(input_ids=ids, attention_mask=attention).logits
            z2 = model(input_ids=ids, attention_mask=attention).logits
            p2 = z2.softmax(-1)
            per_token = (p2 * (z2.log_softmax(-1) - z1.log_softmax(-1))).sum(-1)
            (per_token * attention).sum().backward()
            assert not scales, "every dropout draw is used exactly once"
            for kind, mask in masks.items():
                totals[kind] += mask.grad.abs() if absolute else mask.grad
                mask.grad = None
            tokens += int(attention.sum())
    finally:
        for module in patched:
            del module.forward
    return {kind: (total / tokens).float() for kind, total in totals.items()}


@pytest.mark.parametrize("absolute", [False, True], ids=["signed", "absolute"])
def test_mask_gradients_equal_brute_force_reference(absolute: bool) -> None:
    """Catches a head mask on the wrong axis or head layout (GQA: 4 query heads, 2 kv heads), the
    neuron mask after the gate product or on gate_proj, the hidden mask on the wrong module, a
    gradient through one pass only, padding in the loss, per-batch |grad| applied after summing,
    a wrong token division, and dropout drawn in another order than documented."""
    model = tiny_llama()
    batches = random_batches(count=3, rows=3, length=9, seed=11)
    want = reference_mask_gradients(tiny_llama(), batches, dropout=0.1, seed=5, absolute=absolute)
    got = mask_gradients(model, batches, dropout=0.1, absolute=absolute, seed=5)
    assert {kind: tuple(t.shape) for kind, t in got.items()} == {
        "heads": (2, 4),
        "intermediate": (2, 98),
        "hidden": (2, 56),
    }
    assert_close_relative(got, want, rtol=1e-4)
    other_seed = mask_gradients(model, batches, dropout=0.1, absolute=absolute, seed=6)
    assert not torch.allclose(other_seed["heads"], got["heads"]), "the seed must change the dropout masks"


def test_without_dropout_the_gradients_vanish() -> None:
    """Why CoFiTune adds dropout: with p = 0 both passes agree and KL has zero gradient. Catches a
    loss that is not a divergence between the two passes (e.g. a cross-entropy on the tokens)."""
    model, batches = tiny_llama(), random_batches(count=2, rows=2, length=8, seed=3)
    with_dropout = mask_gradients(model, batches, dropout=0.05)
    without = mask_gradients(model, batches, dropout=0.0)
    for kind in without:
        assert float(with_dropout[kind].abs().max()) > 0
        assert float(without[kind].abs().max()) <= 1e-6 * float(with_dropout[kind].abs().max()), kind


def test_padding_does_not_count() -> None:
    """Catches padding tokens in the loss or the token count, and dropout masks that depend on the
    padded shape or on which rows share a batch (right and left padding, an all-padding row)."""
    model = tiny_llama()
    batches = random_batches(count=2, rows=3, length=8, seed=21)
    base = mask_gradients(model, batches, dropout=0.05, seed=1)

    def padded(batch, extra: int, left: bool) -> dict:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if left:  # move every row's real tokens to the right end, then add columns on the left
            order = torch.argsort(mask, dim=1, stable=True)
            ids, mask = ids.gather(1, order), mask.gather(1, order)
        filler = torch.randint(1, VOCAB, (ids.shape[0], extra))  # pad ids are not always 0
        zeros = torch.zeros_like(filler)
        if left:
            return {"input_ids": torch.cat([filler, ids], 1), "attention_mask": torch.cat([zeros, mask], 1)}
        return {"input_ids": torch.cat([ids, filler], 1), "attention_mask": torch.cat([mask, zeros], 1)}

    right = [padded(b, extra=5, left=False) for b in batches]
    right[0] = {  # plus a row that is padding only
        "input_ids": torch.cat([right[0]["input_ids"], torch.randint(1, VOCAB, (1, 13))]),
        "attention_mask": torch.cat([right[0]["attention_mask"], torch.zeros(1, 13, dtype=torch.long)]),
    }
    left = [padded(b, extra=3, left=True) for b in batches]
    rows = [{key: value[row : row + 1] for key, value in b.items()} for b in batches for row in range(3)]
    for name, variant in {"right": right, "left": left, "one row per batch": rows}.items():
        got = mask_gradients(model, variant, dropout=0.05, seed=1)
        try:
            assert_close_relative(got, base, rtol=1e-5)
        except AssertionError as error:
            raise AssertionError(f"{name} padding: {error}") from None


def test_model_is_left_as_it_was() -> None:
    """Catches hooks left on the model, parameters left requiring grad (or frozen ones unfrozen),
    eval mode lost, .grad left on parameters, and changed weights."""
    model = tiny_llama()
    model.eval()
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(1, VOCAB, (2, 7))
    logits = model(input_ids=ids).logits
    with torch.no_grad():  # a caller under no_grad still gets gradients inside
        result = compute_importance(model, random_batches(2, 2, 7, seed=4), source="general.jsonl")
    assert float(result.heads.max()) > 0
    assert all(len(m._forward_hooks) + len(m._forward_pre_hooks) == 0 for m in model.modules())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert torch.equal(model(input_ids=ids).logits, logits)


def test_compute_importance_normalises_and_records_its_source() -> None:
    """Catches importance that skips the per-layer normalisation or loses the run settings."""
    model, batches = tiny_llama(), random_batches(count=2, rows=2, length=6, seed=8)
    raw = mask_gradients(model, batches, dropout=0.02, absolute=True, seed=3)
    result = compute_importance(model, iter(batches), dropout=0.02, absolute=True, seed=3, source="general")
    for kind, tensor in result.tensors().items():
        assert torch.equal(tensor, normalise(raw[kind])), kind
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert result.meta == {
        "source": "general",
        "batches": 2,
        "tokens": tokens,
        "dropout": 0.02,
        "absolute": True,
        "world_size": 1,
        "seed": 3,
        "model": "LlamaForCausalLM",
    }


def test_bad_input_gets_named_errors() -> None:
    """Catches silent acceptance of other architectures, impossible dropout, malformed batches
    and data without a single real token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        mask_gradients(gpt2, [])
    model = tiny_llama()
    with pytest.raises(ValueError, match="dropout"):
        mask_gradients(model, [], dropout=1.0)
    with pytest.raises(ValueError, match="batch 1"):
        mask_gradients(model, [random_batches(1, 1, 4, seed=1)[0], {"ids": torch.ones(1, 4)}])
    with pytest.raises(ValueError, match="real token"):
        mask_gradients(
            model, [{"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.zeros(1, 4)}]
        )
    assert all(len(m._forward_hooks) + len(m._forward_pre_hooks) == 0 for m in model.modules())


# ----------------------------------------------------------------------------- normalise, artifact


def test_normalise_known_values() -> None:
    """Catches a biased std, a z-score over the whole tensor instead of per layer, a missing abs,
    and NaN for a layer whose units are all equal."""
    raw = torch.tensor(
        [[1.0, 2.0, 3.0, 2.0], [0.0, 0.0, 0.0, 4.0], [30.0, -10.0, 10.0, 10.0], [5.0, 5.0, 5.0, 5.0]]
    )
    # row 0: mean 2, unbiased std sqrt(2/3); row 1: mean 1, std 2; row 2: mean 10, std sqrt(800/3)
    z = torch.tensor(
        [
            [-1.0 / (2 / 3) ** 0.5, 0.0, 1.0 / (2 / 3) ** 0.5, 0.0],
            [-0.5, -0.5, -0.5, 1.5],
            [20 / (800 / 3) ** 0.5, -20 / (800 / 3) ** 0.5, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    got = normalise(raw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, z.tanh().abs(), rtol=1e-6, atol=1e-7)
    scaled_rows = normalise(raw * torch.tensor([[100.0], [1.0], [0.01], [3.0]]))
    torch.testing.assert_close(
        scaled_rows, got, rtol=1e-6, atol=1e-7, msg="each row is normalised on its own"
    )


def test_normalise_stays_below_one() -> None:
    """float32 tanh of a z-score above ~9 is exactly 1: catches importance 1 (a soft mask that
    zeroes the unit) breaking the [0, 1) contract."""
    raw = torch.zeros(2, 400)
    raw[0, 7] = 1e6  # z = 399 / sqrt(400) ~ 20
    raw[1] = torch.randn(400, generator=torch.Generator().manual_seed(0))
    got = normalise(raw)
    assert float(got.min()) >= 0 and float(got.max()) < 1
    assert float(got[0, 7]) > 0.9999
    assert normalise(torch.ones(3, 1)).eq(0).all(), "a single unit per layer has no ranking"
    with pytest.raises(ValueError, match="layers, units"):
        normalise(torch.ones(4))


def random_importance(seed: int, source: str) -> UnitImportance:
    generator = torch.Generator().manual_seed(seed)
    return UnitImportance(
        heads=torch.rand(3, 5, generator=generator),
        intermediate=torch.rand(3, 37, generator=generator),
        hidden=torch.rand(3, 23, generator=generator),
        meta={"source": source, "tokens": 1234, "dropout": 0.003, "absolute": False, "seed": seed},
    )


def test_save_load_round_trip_is_bit_identical(tmp_path: Path) -> None:
    """Catches lossy storage (dtype casts, JSON floats), lost meta and temp files left behind."""
    importance = random_importance(0, "general.jsonl")
    path = tmp_path / "importance.safetensors"
    random_importance(9, "old").save(path)  # overwritten in place
    importance.save(path)
    loaded = UnitImportance.load(path)
    for kind, tensor in importance.tensors().items():
        assert torch.equal(getattr(loaded, kind), tensor), kind
    assert loaded.meta == importance.meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["importance.safetensors"]


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    """Catches a bare KeyError / safetensors error / silent acceptance of values outside [0, 1)
    instead of a message that names the file."""
    from safetensors.torch import save_file

    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        UnitImportance.load(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        UnitImportance.load(garbage)
    good = random_importance(1, "x")
    partial = tmp_path / "partial.safetensors"
    save_file({"heads": good.heads, "hidden": good.hidden}, str(partial), metadata={"meta": "{}"})
    with pytest.raises(ValueError, match=r"partial\.safetensors.*intermediate"):
        UnitImportance.load(partial)
    no_meta = tmp_path / "no_meta.safetensors"
    save_file(good.tensors(), str(no_meta))
    with pytest.raises(ValueError, match=r"no_meta\.safetensors.*meta"):
        UnitImportance.load(no_meta)
    out_of_range = tmp_path / "range.safetensors"
    UnitImportance(good.heads * 2, good.intermediate, good.hidden, meta={}).save(out_of_range)
    with pytest.raises(ValueError, match=r"range\.safetensors.*heads.*\[0, 1\)"):
        UnitImportance.load(out_of_range)


def test_combine_is_elementwise_max() -> None:
    """Catches a mean or sum instead of the max, combining only two of several, and combining
    importances of different models."""
    first, second, third = (random_importance(seed, f"s{seed}") for seed in (1, 2, 3))
    combined = first.combine(second, third)
    for kind in ("heads", "intermediate", "hidden"):
        want = torch.maximum(torch.maximum(getattr(first, kind), getattr(second, kind)), getattr(third, kind))
        assert torch.equal(getattr(combined, kind), want), kind
    assert combined.meta["source"] == "max(s1, s2, s3)"
    assert combined.meta["combined_from"] == [first.meta, second.meta, third.meta]
    assert torch.equal(first.heads, random_importance(1, "s1").heads), "combine must not modify its inputs"
    other_model = UnitImportance(first.heads[:2], first.intermediate[:2], first.hidden[:2], meta={})
    with pytest.raises(ValueError, match="different models"):
        first.combine(other_model)


# ----------------------------------------------------------------------------- ZeRO-3, 2 ranks


@pytest.mark.distributed
def test_zero3_two_ranks_equal_single_process(tmp_path: Path) -> None:
    """Rank 0 gets batches 0, 2, 4 and rank 1 gets 1, 3 of a ZeRO-3 (zero.Init) model: catches a
    rank-local token division, a missing or doubled all-reduce, ranks with fewer batches
    deadlocking, dropout masks that depend on the rank, a model left gathered, modified, hooked
    or unusable for the training initialize, and gathering more than one layer at a time."""
    batches = random_batches(count=5, rows=3, length=9, seed=31)
    torch.save(initial_state(), tmp_path / "init.pt")
    torch.save(batches, tmp_path / "batches.pt")
    spec = {
        "init": str(tmp_path / "init.pt"),
        "batches": str(tmp_path / "batches.pt"),
        "split": [[0, 2, 4], [1, 3]],
        "dropout": 0.01,
        "seed": 7,
        "out": str(tmp_path / "out.pt"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_ranks([WORKER, str(tmp_path / "spec.json")], world_size=2, timeout=120)
    result = torch.load(tmp_path / "out.pt")

    model = tiny_llama()
    raw = mask_gradients(model, batches, dropout=0.01, seed=7)
    assert_close_relative(result["raw"], raw, rtol=1e-5)
    dense = compute_importance(model, batches, dropout=0.01, seed=7)
    for kind, tensor in dense.tensors().items():
        torch.testing.assert_close(result["importance"][kind], tensor, rtol=0, atol=1e-5)
    meta = result["importance"]["meta"]
    assert (meta["batches"], meta["tokens"], meta["world_size"], meta["source"]) == (
        5,
        dense.meta["tokens"],
        2,
        "zero3",
    )

    checks = result["checks"]
    initial = initial_state()
    assert checks["partitioned"], "parameters must be partitioned again afterwards"
    assert all(torch.equal(value, initial[name]) for name, value in result["after"].items())
    assert checks["requires_grad"] == {name: name != "never_used" for name in initial}
    assert not checks["training"] and checks["grads"] == [] and checks["hooks_unchanged"]
    largest_layer = max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)
    assert 0 < checks["peak_live_numel"] <= largest_layer, "at most one decoder layer gathered at a time"
    assert checks["trained_moved"] and torch.isfinite(torch.tensor(checks["train_loss"]))
