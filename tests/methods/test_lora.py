"""LoRA through peft as a plan (no DeepSpeed): the adapters train, the base stays frozen, the merged
weights come back under the base model's names."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from peft.tuners.lora import LoraLayer
from test_methods import gpt2, llama

import dsforget
from dsforget import PlanError
from dsforget.errors import ConfigError
from dsforget.integration.export import full_tensors
from dsforget.methods.lora import add_adapters
from dsforget.train.run_config import RunConfig

logging.getLogger("transformers").setLevel(logging.ERROR)

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapted(options: dict, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(1)
    model = llama(layers)
    add_adapters(model, options, seed=seed)
    return model


def adapted_paths(plan: dsforget.MaskPlan) -> set[str]:
    return {name.partition(".lora_")[0] for name, rule in plan.rules.items() if rule.trains}


ALL_LINEAR = {
    f"model.layers.{i}.{block}.{name}"
    for i in range(2)
    for block, names in (("self_attn", LINEAR[:4]), ("mlp", LINEAR[4:]))
    for name in names
}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, ALL_LINEAR),
        ({"target_modules": "q_proj,v_proj"}, {p for p in ALL_LINEAR if p.endswith(("q_proj", "v_proj"))}),
        ({"target_modules": ["layers.1.mlp.down_proj"]}, {"model.layers.1.mlp.down_proj"}),
    ],
    ids=["all-linear", "names", "path"],
)
def test_the_adapters_train_and_everything_else_is_frozen(options: dict, expected: set[str]) -> None:
    """all-linear adapts every linear layer but lm_head (peft's rule); each adapted layer trains
    its lora_A and lora_B and nothing else, its base weight included."""
    model = adapted(options)
    plan = dsforget.plan_for(model, "lora", **options)
    trained = {name for name, rule in plan.rules.items() if rule.trains}
    assert adapted_paths(plan) == expected
    assert trained == {f"{path}.lora_{ab}.default.weight" for path in expected for ab in "AB"}
    assert all(plan.rules[f"{path}.base_layer.weight"].mode == "frozen" for path in expected)
    assert plan.meta["scale"] == 2.0 and plan.meta["adapted_modules"] == len(expected)


def test_adapters_start_from_the_seed_alone() -> None:
    """The same seed gives the same A whatever the RNG did before (ZeRO-3's construction draws
    differently from a plain one); B starts at zero, so the adapted model equals the base."""
    first = adapted({"rank": 4}, seed=3)
    torch.rand(1000)
    second = adapted({"rank": 4}, seed=3)
    other = adapted({"rank": 4}, seed=4)
    a_name = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    params = [dict(m.named_parameters()) for m in (first, second, other)]
    assert torch.equal(params[0][a_name], params[1][a_name])
    assert not torch.equal(params[0][a_name], params[2][a_name])
    assert all(p.abs().sum() == 0 for n, p in params[0].items() if ".lora_B." in n)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 0}, r"lora option rank=0 must be an integer >= 1"),
        ({"rank": 2.5}, r"lora option rank=2\.5 must be an integer >= 1"),
        ({"alpha": 0}, r"lora option alpha=0 must be a finite number > 0"),
        ({"dropout": 1.0}, r"lora option dropout=1\.0 must be a number in \[0, 1\)"),
        ({"target_modules": "q_proj,"}, r"lora option target_modules='q_proj,' holds an empty name"),
        (
            {"target_modules": ["q_proj", "qkv"]},
            r"lora option target_modules: no module 'qkv' in LlamaForCausalLM",
        ),
    ],
)
def test_bad_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        adapted(options)


def test_plan_needs_the_adapters_it_describes() -> None:
    """A plan for adapters the model does not carry (none, or another rank) is refused."""
    with pytest.raises(PlanError, match="carries no adapter of rank 8"):
        dsforget.plan_for(llama(2), "lora")
    with pytest.raises(PlanError, match="carries no adapter of rank 4"):
        dsforget.plan_for(adapted({}), "lora", rank=4)


def test_lora_combines_with_mofo_only() -> None:
    """lora+mofo filters each adapter matrix by momentum; the methods that choose or pull base
    weights are refused, as plans and as run configs."""
    model = adapted({"rank": 4})
    plan = dsforget.plan_for(model, "lora+mofo", {"fraction": 0.25}, rank=4)
    trains = {name: rule for name, rule in plan.rules.items() if rule.trains}
    assert trains and all(
        ".lora_" in n and r.mode == "topk" and r.fraction == 0.25 for n, r in trains.items()
    )
    for other in ("hft", "cofitune", "freeze", "l2"):
        with pytest.raises(PlanError, match=f"lora combines only with mofo .*{other} chooses or pulls"):
            dsforget.plan_for(model, f"lora+{other}")
        with pytest.raises(ConfigError, match="lora combines only with mofo"):
            RunConfig(method=f"{other}+lora")
    with pytest.raises(ConfigError, match="export_adapter: method 'full' trains no adapter"):
        RunConfig(method="full", export_adapter=True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_weights_equal_peft_merge_and_unload(family: str) -> None:
    """full_tensors (what the export and drift read) yields W + (alpha/rank)·B·A under the base
    names, as peft's merge_and_unload computes it; GPT-2's Conv1D stores W transposed
    (fan_in_fan_out), which peft's delta follows."""
    torch.manual_seed(0)
    model = llama(2) if family == "llama" else gpt2(2)
    base_names = [name for name, _ in model.named_parameters()]
    add_adapters(model, {"rank": 4, "alpha": 12}, seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()  # B starts at zero: make the delta visible
    engine = SimpleNamespace(module=model, zero_optimization_stage=lambda: 0)
    merged = {name: tensor.clone() for name, tensor in full_tensors(engine)}
    reference = copy.deepcopy(model)
    for layer in reference.modules():
        if isinstance(layer, LoraLayer):
            layer.merge()  # peft's own merge, into base_layer.weight
    expected = {
        name.replace(".base_layer.", "."): param
        for name, param in reference.named_parameters()
        if ".lora_" not in name
    }
    assert list(expected) == base_names and list(merged)[: len(base_names)] == base_names  # buffers after
    for name in base_names:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-6, atol=1e-6)
    own = dict(model.named_parameters())
    for name in base_names:  # unadapted parameters and adapted biases come out as they are
        path, _, leaf = name.rpartition(".")
        source = own.get(name, own.get(f"{path}.base_layer.{leaf}"))
        assert torch.equal(merged[name], source) != (name not in own and leaf == "weight"), name
