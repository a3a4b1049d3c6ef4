"""HFT, CoFiTune and method combinations: the plans they build (single process, no DeepSpeed)."""

from __future__ import annotations

import logging
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import dsforget
from dsforget import PlanError
from dsforget.methods.architecture import anatomy, layer_range
from dsforget.methods.hft import per_layer_counts

logging.getLogger("transformers").setLevel(logging.ERROR)


def llama(layers: int = 4, kv_heads: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def gpt2(layers: int = 3) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=layers, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    config.bos_token_id = config.eos_token_id = 0
    return GPT2LMHeadModel(config)


def qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        num_hidden_layers=2,
        hidden_size=16,
        intermediate_size=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    return Qwen2ForCausalLM(config)


def trained_modules(plan: dsforget.MaskPlan, layer: int, category: str) -> list[str]:
    return plan.meta["trained_per_layer"][str(layer)].get(category, [])


@pytest.mark.parametrize("layers", [4, 5])
def test_hft_trains_half_of_each_category_per_layer(layers: int) -> None:
    """Catches a selection that is half of all matrices but not half per category and layer, and
    an FFN split that does not alternate 1/2 across layers (METHODS.md's rule)."""
    model = llama(layers)
    plan = dsforget.plan_for(model, "hft", seed=7)
    ffn_counts = []
    for layer in range(layers):
        assert len(trained_modules(plan, layer, "attention")) == 2
        assert len(trained_modules(plan, layer, "norm")) == 1
        ffn_counts.append(len(trained_modules(plan, layer, "ffn")))
    assert Counter(ffn_counts) == {1: layers // 2, 2: layers - layers // 2}
    # the rules follow the recorded choice: q/k/v/o, gate/up/down and norms of every layer
    for layer in range(layers):
        chosen = {m for c in ("attention", "ffn", "norm") for m in trained_modules(plan, layer, c)}
        for module in [
            p.split(f"layers.{layer}.")[1].rsplit(".", 1)[0] for p in plan.rules if f"layers.{layer}." in p
        ]:
            name = f"model.layers.{layer}.{module}.weight"
            assert plan.rules[name].trains == (module in chosen), name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert plan.rules[name].mode == "dense"


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_hft_trainable_share_matches_fraction_within_one_matrix(fraction: float) -> None:
    """Catches a configured fraction that is ignored or rounded per layer the same way every time."""
    model = llama(layers=6, kv_heads=4)  # no GQA: every attention matrix has the same size
    plan = dsforget.plan_for(model, "hft", trainable_fraction=fraction, seed=1)
    body = anatomy(model)
    matrices = [m for layer in body.layers for m in layer if m.category != "norm"]
    total = sum(m.numel for m in matrices)
    trained = sum(m.numel for m in matrices if plan.rules[m.params[0]].trains)
    assert abs(trained - fraction * total) <= max(m.numel for m in matrices)


def test_hft_is_reproducible_from_the_seed_and_differs_across_seeds() -> None:
    """Catches a selection drawn from global RNG state (different on every rank) instead of the seed."""
    torch.manual_seed(123)
    first = dsforget.plan_for(llama(8), "hft", seed=3)
    torch.manual_seed(456)
    again = dsforget.plan_for(llama(8), "hft", seed=3)
    other = dsforget.plan_for(llama(8), "hft", seed=4)
    assert first.digest == again.digest
    assert first.digest != other.digest


def test_per_layer_counts_spread_the_fractional_part() -> None:
    import random

    assert per_layer_counts(4, 4, 0.5, random.Random(0)) == [2, 2, 2, 2]
    counts = per_layer_counts(7, 3, 0.5, random.Random(0))
    assert sorted(counts) == [1, 1, 1, 2, 2, 2, 2]
    assert per_layer_counts(3, 3, 1.0, random.Random(0)) == [3, 3, 3]


def test_hft_balance_by_parameters_halves_gqa_attention() -> None:
    """Under GQA k and v are smaller than q and o: 2 of 4 matrices is not half the attention
    parameters; balance="params" must reach exactly half where a subset allows it."""
    model = llama(layers=4, kv_heads=1)  # q, o: 32x32; k, v: 8x32 -> {q, k} is 1024+256 = half
    body = anatomy(model)
    for balance, exact in (("count", False), ("params", True)):
        plan = dsforget.plan_for(model, "hft", balance=balance, seed=2)
        for layer in body.layers:
            attention = [m for m in layer if m.category == "attention"]
            share = sum(m.numel for m in attention if plan.rules[m.params[0]].trains) / sum(
                m.numel for m in attention
            )
            assert (share == 0.5) or not exact, (balance, share)


def test_hft_gpt2_trains_one_of_two_per_category() -> None:
    """GPT-2 fuses q, k, v: the rule becomes 1 of 2 per category; biases follow their weights."""
    plan = dsforget.plan_for(gpt2(), "hft", seed=0)
    for layer in range(3):
        assert len(trained_modules(plan, layer, "attention")) == 1
        assert len(trained_modules(plan, layer, "ffn")) == 1
        for module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            weight = plan.rules[f"transformer.h.{layer}.{module}.weight"]
            bias = plan.rules[f"transformer.h.{layer}.{module}.bias"]
            assert weight.mode == bias.mode
    assert plan.meta["family"] == "gpt2"


def test_hft_qwen2_biases_follow_their_matrix() -> None:
    plan = dsforget.plan_for(qwen2(), "hft", seed=5)
    for name, rule in plan.rules.items():
        if name.endswith(".bias"):
            assert plan.rules[name[: -len("bias")] + "weight"].mode == rule.mode, name


def test_hft_switches_for_norms_embeddings_and_final_norm() -> None:
    plan = dsforget.plan_for(llama(2), "hft", norms="freeze", embeddings="freeze", final_norm="freeze")
    frozen = {name for name, rule in plan.rules.items() if not rule.trains}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= frozen
    assert all(name in frozen for name in plan.rules if "layernorm" in name)
    plan = dsforget.plan_for(llama(2), "hft", norms="train")
    assert all(plan.rules[name].trains for name in plan.rules if "layernorm" in name)


class Mystery(nn.Module):
    """Numbered layers whose modules match no naming family."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"mixer": nn.Linear(4, 4)}) for _ in range(2)])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"trainable_fraction": 0.0}, r"trainable_fraction=0.0 must be in \(0, 1\]"),
        ({"norms": "some"}, r"norms='some' is not allowed; choose one of half, train, freeze"),
        ({"balance": "flops"}, r"balance='flops' is not allowed"),
        ({"fraction": 0.2}, r"method 'hft' has no option 'fraction'; its options: balance, embeddings"),
    ],
)
def test_hft_bad_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        dsforget.plan_for(llama(2), "hft", **options)


def test_unknown_architecture_is_named() -> None:
    """Catches selecting by substring with no error when nothing matches (STYLE.md)."""
    with pytest.raises(
        PlanError, match=r"cannot categorise the layers of Mystery: layer 0 has modules \['mixer'\]"
    ):
        dsforget.plan_for(Mystery(), "hft")


def test_layer_ranges_follow_cofitune() -> None:
    assert layer_range("bottom2", 8) == range(2, 4)
    assert layer_range("middle-plus", 8) == range(2, 6)
    assert layer_range("top", 8) == range(6, 8)
    with pytest.raises(PlanError, match="layer range 'bottom3' is unknown"):
        layer_range("bottom3", 8)
    with pytest.raises(PlanError, match="'bottom1' is empty for a model with 2 layers"):
        layer_range("bottom1", 2)


@pytest.mark.parametrize(
    ("layers", "modules", "expected"),
    [
        (
            "bottom2",
            "ffn",
            {(2, "mlp.up_proj"), (3, "mlp.up_proj"), (2, "mlp.down_proj"), (3, "mlp.down_proj")},
        ),
        ("top", "mha", {(i, f"self_attn.{x}_proj") for i in (6, 7) for x in "qkv"}),
    ],
)
def test_cofitune_coarse_trains_only_chosen_modules_in_range(
    layers: str, modules: str, expected: set
) -> None:
    """Catches o_proj or gate_proj trained (CoFiTune never trains them) and embeddings left trainable."""
    plan = dsforget.plan_for(llama(8), "cofitune", layers=layers, modules=modules)
    trained = {name for name, rule in plan.rules.items() if rule.trains}
    assert trained == {f"model.layers.{i}.{module}.weight" for i, module in expected}


def fake_importance(layers: int, heads: int = 4, intermediate: int = 48, hidden: int = 32) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        heads=torch.rand(layers, heads, generator=generator),
        intermediate=torch.rand(layers, intermediate, generator=generator),
        hidden=torch.rand(layers, hidden, generator=generator),
        meta={"source": "test"},
    )


def test_cofitune_row_scales_are_one_minus_unit_importance() -> None:
    """Catches head scales not repeated head_dim times, GQA k/v heads mapped to the wrong query
    heads, and up/down rows scaled by the wrong unit kind."""
    importance = fake_importance(4)
    plan = dsforget.plan_for(
        llama(4, kv_heads=2), "cofitune", layers="top-plus", modules="both", importance=importance
    )
    layer = 3
    rules = {
        name.split(f"layers.{layer}.")[1]: rule
        for name, rule in plan.rules.items()
        if f"layers.{layer}." in name
    }
    head_dim = 8
    heads = importance.heads[layer]
    expect_q = (1 - heads).repeat_interleave(head_dim)
    expect_kv = (1 - heads.reshape(2, 2).mean(dim=1)).repeat_interleave(head_dim)
    torch.testing.assert_close(torch.tensor(rules["self_attn.q_proj.weight"].row_scale), expect_q)
    torch.testing.assert_close(torch.tensor(rules["self_attn.k_proj.weight"].row_scale), expect_kv)
    torch.testing.assert_close(torch.tensor(rules["self_attn.v_proj.weight"].row_scale), expect_kv)
    torch.testing.assert_close(
        torch.tensor(rules["mlp.up_proj.weight"].row_scale), 1 - importance.intermediate[layer]
    )
    torch.testing.assert_close(
        torch.tensor(rules["mlp.down_proj.weight"].row_scale), 1 - importance.hidden[layer]
    )
    assert rules["self_attn.o_proj.weight"].mode == rules["mlp.gate_proj.weight"].mode == "frozen"
    plan.check_parameters((n, tuple(p.shape)) for n, p in llama(4, kv_heads=2).named_parameters())


def test_cofitune_importance_for_another_model_is_refused() -> None:
    with pytest.raises(PlanError, match=r"importance.heads has shape \(3, 4\); the model has 4 layers"):
        dsforget.plan_for(llama(4), "cofitune", importance=fake_importance(3))
    with pytest.raises(PlanError, match="has 40 units, the matrix 48 rows"):
        dsforget.plan_for(llama(4), "cofitune", importance=fake_importance(4, intermediate=40))


def test_hft_plus_mofo_filters_what_hft_trains() -> None:
    """Catches a composition that un-freezes HFT's frozen half or skips MoFO's filter on it."""
    model = llama(4)
    hft = dsforget.plan_for(model, "hft", seed=9)
    both = dsforget.plan_for(model, "hft+mofo", defaults={"seed": 9, "fraction": 0.2})
    assert both.method == "hft+mofo" and set(both.meta) == {"hft", "mofo"}
    for name, rule in both.rules.items():
        if not hft.rules[name].trains:
            assert rule.mode == "frozen", name
        elif "norm" in name:
            assert rule.mode == "dense", name
        else:
            assert (rule.mode, rule.fraction) == ("topk", 0.2), name


def test_cofitune_plus_mofo_keeps_row_scales_under_topk() -> None:
    both = dsforget.plan_for(
        llama(4), "cofitune+mofo", importance=fake_importance(4), layers="top", fraction=0.3
    )
    trained = {name: rule for name, rule in both.rules.items() if rule.trains}
    assert trained and all(r.mode == "topk" and r.row_scale is not None for r in trained.values())


def test_method_names_and_combinations_are_checked() -> None:
    with pytest.raises(
        PlanError,
        match=r"method 'hft\+dora': unknown 'dora'; available: cofitune, freeze, full, hft, l2, lora",
    ):
        dsforget.plan_for(llama(2), "hft+dora")
    with pytest.raises(PlanError, match="a part repeats"):
        dsforget.plan_for(llama(2), "mofo+mofo")
