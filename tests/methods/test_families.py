"""Every model family of the README's table builds HFT and CoFiTune plans that mean what the papers
mean, on a tiny randomly initialised `transformers` model of that family; fused Phi-3 row blocks
are frozen exactly by the optimizer; mixture-of-experts models are refused."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import dsforget
from dsforget import MaskPlan, ParamRule, PlanError
from dsforget.methods.architecture import Anatomy, Matrix, anatomy

logging.getLogger("transformers").setLevel(logging.ERROR)

# hidden 32, 4 query heads of 8, 2 key/value heads, intermediate 48, 2 layers
COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)


def _decoder(config_class: str, model_class: str, **extra) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, config_class)(**{**COMMON, **extra})
        return getattr(transformers, model_class)(config)

    return build


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    config.bos_token_id = config.eos_token_id = 0
    return GPT2LMHeadModel(config)


# the README's families table: one tiny model per row
FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "llama": _decoder("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _decoder("MistralConfig", "MistralForCausalLM"),
    "qwen2": _decoder("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": _decoder("Qwen3Config", "Qwen3ForCausalLM", head_dim=8),
    "gemma2": _decoder("Gemma2Config", "Gemma2ForCausalLM", head_dim=8),
    "gemma3": _decoder("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=8),
    "olmo2": _decoder("Olmo2Config", "Olmo2ForCausalLM"),
    "phi3": _decoder("Phi3Config", "Phi3ForCausalLM", pad_token_id=0),
    "gpt2": _gpt2,
}
MIXTURES_OF_EXPERTS = {
    "mixtral": _decoder("MixtralConfig", "MixtralForCausalLM", num_local_experts=4),
    "qwen2moe": _decoder(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        num_experts=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    ),
    "qwen3moe": _decoder("Qwen3MoeConfig", "Qwen3MoeForCausalLM", num_experts=4, moe_intermediate_size=16),
}


def test_the_readme_table_lists_exactly_the_tested_families() -> None:
    """Catches a README row no test backs, or a tested family the README does not list."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Model families", 1)[1].split("\n- ", 1)[0]
    assert re.findall(r"^\| `(\w+)` \|", section, flags=re.M) == list(FAMILIES)


def trains(plan: MaskPlan, body: Anatomy, matrix: Matrix) -> bool:
    """Whether every row of `matrix` trains under `plan`; fails if only some of them do."""
    states = set()
    for name in matrix.params:
        rows = body.shapes[name][0]
        start, stop = matrix.rows or (0, rows)
        trained = {r for a, b in plan[name].trained_rows(rows) for r in range(a, b)}
        block = set(range(start, stop))
        states.add("all" if block <= trained else "none" if not block & trained else "part")
    assert states in ({"all"}, {"none"}), f"{matrix.module} of layer {matrix.layer} trains in part: {states}"
    return states == {"all"}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_builds_an_hft_plan_with_half_of_each_category(family: str) -> None:
    """Catches a family whose matrices HFT does not see (a fused module counted as one matrix, a
    norm left out) or a fused row block that trains in part."""
    model = FAMILIES[family]()
    plan = dsforget.plan_for(model, "hft", seed=4)
    plan.check_parameters((name, tuple(p.shape)) for name, p in model.named_parameters())
    body = anatomy(model)
    for category in ("attention", "ffn", "norm"):
        per_layer = [[m for m in layer if m.category == category] for layer in body.layers]
        trained = [sum(trains(plan, body, m) for m in matrices) for matrices in per_layer]
        total = sum(len(matrices) for matrices in per_layer)
        assert sum(trained) == total // 2, f"{category}: {trained} of {[len(m) for m in per_layer]}"
        if category == "attention":  # 2 of {q, k, v, o} in every layer (GPT-2: 1 of its 2)
            assert trained == [len(per_layer[0]) // 2] * len(per_layer)
        for index, matrices in enumerate(per_layer):
            chosen = {m.module for m in matrices if trains(plan, body, m)}
            assert chosen == set(plan.meta["trained_per_layer"][str(index)].get(category, []))
    for name in body.embeddings + body.final_norms:
        assert plan[name].trains


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("modules", ["mha", "ffn", "both"])
def test_every_family_builds_a_cofitune_plan_of_its_modules_in_range(family: str, modules: str) -> None:
    """Catches CoFiTune training gate or o (never trained), or a fused Phi-3 module trained whole
    when only its up rows should train."""
    model = FAMILIES[family]()
    plan = dsforget.plan_for(model, "cofitune", layers="bottom-plus", modules=modules)  # layer 0 of 2
    plan.check_parameters((name, tuple(p.shape)) for name, p in model.named_parameters())
    body = anatomy(model)
    roles = {"mha": {"q", "k", "v"}, "ffn": {"up", "down"}}
    expected = roles["mha"] | roles["ffn"] if modules == "both" else roles[modules]
    for index, layer in enumerate(body.layers):
        trained = {m.module for m in layer if trains(plan, body, m)}
        if index > 0:
            assert not trained
        elif family == "gpt2":  # fused c_attn is q, k and v together
            names = {"mha": {"attn.c_attn"}, "ffn": {"mlp.c_fc", "mlp.c_proj"}}
            assert trained == (names["mha"] | names["ffn"] if modules == "both" else names[modules])
        else:
            assert {m.role for m in layer if m.module in trained} == expected
    assert not any(plan[name].trains for name in body.embeddings + body.final_norms)


def test_phi3_fused_rows_map_to_q_k_v_and_gate_up() -> None:
    """Catches k and v taking equal thirds of qkv_proj under grouped-query attention (q has
    num_heads·head_dim = 32 rows, k and v 2·8 = 16 each), or gate and up swapped (Phi3MLP's
    chunk(2): gate first)."""
    body = anatomy(FAMILIES["phi3"]())
    assert body.family.name == "phi3"
    blocks = {m.module: (m.role, m.category, m.rows) for m in body.layers[0] if m.rows is not None}
    assert blocks == {
        "self_attn.qkv_proj[q]": ("q", "attention", (0, 32)),
        "self_attn.qkv_proj[k]": ("k", "attention", (32, 48)),
        "self_attn.qkv_proj[v]": ("v", "attention", (48, 64)),
        "mlp.gate_up_proj[gate]": ("gate", "ffn", (0, 48)),
        "mlp.gate_up_proj[up]": ("up", "ffn", (48, 96)),
    }
    cofitune = dsforget.plan_for(FAMILIES["phi3"](), "cofitune", layers="bottom-plus", modules="ffn")
    assert cofitune["model.layers.0.mlp.gate_up_proj.weight"].frozen_rows == ((0, 48),)
    assert cofitune["model.layers.0.mlp.down_proj.weight"] == ParamRule("dense")


def test_phi3_cofitune_row_scales_cover_the_up_rows_only() -> None:
    """Catches importance scales placed on gate_up_proj's gate rows instead of its up rows."""
    from dsforget.methods.cofitune.importance import UnitImportance

    generator = torch.Generator().manual_seed(0)
    importance = UnitImportance(
        heads=torch.rand(2, 4, generator=generator),
        intermediate=torch.rand(2, 48, generator=generator),
        hidden=torch.rand(2, 32, generator=generator),
        meta={},
    )
    plan = dsforget.plan_for(
        FAMILIES["phi3"](), "cofitune", layers="bottom-plus", modules="both", importance=importance
    )
    gate_up = plan["model.layers.0.mlp.gate_up_proj.weight"]
    assert gate_up.frozen_rows == ((0, 48),)
    torch.testing.assert_close(torch.tensor(gate_up.row_scale[48:]), 1 - importance.intermediate[0])
    qkv = torch.tensor(plan["model.layers.0.self_attn.qkv_proj.weight"].row_scale)
    torch.testing.assert_close(qkv[:32], (1 - importance.heads[0]).repeat_interleave(8))
    kv_heads = 1 - importance.heads[0].reshape(2, 2).mean(dim=1)
    torch.testing.assert_close(qkv[32:48], kv_heads.repeat_interleave(8))
    torch.testing.assert_close(qkv[48:], kv_heads.repeat_interleave(8))


@pytest.mark.parametrize("family", MIXTURES_OF_EXPERTS)
@pytest.mark.parametrize("method", ["hft", "cofitune"])
def test_mixture_of_experts_is_refused_naming_what_is_missing(family: str, method: str) -> None:
    """Catches experts silently left trainable (or frozen) by a plan that does not know them."""
    with pytest.raises(PlanError, match=r"mixture-of-experts layers \(layer 0: mlp\.experts\).*no category"):
        dsforget.plan_for(MIXTURES_OF_EXPERTS[family](), method)


def _phi3_steps(plan: MaskPlan, steps: int = 3) -> tuple[dict, dict, nn.Module]:
    """Steps of ForgetAdamW under `plan`, and of torch's AdamW with whatever the plan freezes put
    back after each step (AdamW is elementwise, so that is AdamW on the trained entries only)."""
    torch.manual_seed(0)
    model = FAMILIES["phi3"]()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = dsforget.ForgetAdamW(model.named_parameters(), plan=plan, lr=1e-2, weight_decay=0.1)
    reference = FAMILIES["phi3"]()
    reference.load_state_dict(model.state_dict())
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, 64, (steps, 2, 10), generator=torch.Generator().manual_seed(1))
    for batch in tokens:
        for net, opt in ((model, optimizer), (reference, adamw)):
            opt.zero_grad()
            net(input_ids=batch, labels=batch).loss.backward()
            opt.step()
        with torch.no_grad():
            for name, param in reference.named_parameters():
                rule = plan[name]
                rows = [(0, param.shape[0])] if not rule.trains else rule.frozen_rows or ()
                for start, stop in rows:
                    param[start:stop] = before[name][start:stop]
    return before, dict(model.named_parameters()), reference


@pytest.mark.parametrize("method", ["hft", "hft+mofo"])
def test_frozen_row_blocks_stay_bit_identical_while_the_others_train(method: str) -> None:
    """Catches weight decay, moments or the top-k update reaching the frozen rows of a fused
    matrix (a row scale of 0 would still decay them), and trained rows that do not follow AdamW."""
    model = FAMILIES["phi3"]()
    options = {"fraction": 0.5} if "mofo" in method else {}
    plan = dsforget.plan_for(model, method, seed=4, **options)
    fused = {n: r for n, r in plan.rules.items() if r.frozen_rows}
    assert fused, "seed 4 should freeze some row blocks of a fused matrix"
    before, after, reference = _phi3_steps(plan)
    expected = dict(reference.named_parameters())
    for name, rule in fused.items():
        for start, stop in rule.frozen_rows:
            assert torch.equal(after[name][start:stop], before[name][start:stop]), f"{name} rows moved"
        for start, stop in rule.trained_rows(before[name].shape[0]):
            moved = after[name][start:stop] != before[name][start:stop]
            assert moved.any(dim=1).all(), f"{name}: rows of [{start}, {stop}) did not train"
            if method == "hft":  # dense rows: elementwise AdamW, whatever the other rows do
                torch.testing.assert_close(after[name][start:stop], expected[name][start:stop])


def test_top_k_counts_only_the_trained_rows() -> None:
    """Catches k taken over the whole fused parameter (its frozen rows included): 6 rows of 4,
    rows 0-1 frozen, fraction 0.25 of the 16 trained entries selects exactly 4."""
    weight = nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(2)))
    before = weight.detach().clone()
    plan = MaskPlan({"w": ParamRule("topk", fraction=0.25, frozen_rows=((0, 2),))})
    optimizer = dsforget.ForgetAdamW([("w", weight)], plan=plan, lr=0.1)
    weight.grad = torch.arange(1.0, 25.0).reshape(6, 4)
    optimizer.step()
    changed = weight.detach() != before
    assert not changed[:2].any() and int(changed.sum()) == 4
    assert changed[5].all()  # the largest gradients are the last row's


def test_resampling_cannot_hold_part_of_a_fused_matrix() -> None:
    """Catches held rows whose Adam step count would advance with the rest of their parameter."""
    model = FAMILIES["phi3"]()
    optimizer = dsforget.ForgetAdamW(model.named_parameters(), plan=dsforget.plan_for(model, "full"))
    with pytest.raises(PlanError, match="part of it cannot be held"):
        optimizer.set_active_plan(dsforget.plan_for(model, "hft", seed=4))
