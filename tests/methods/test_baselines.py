"""The baselines users compare against: layer freezing and L2-SP, as plans (no DeepSpeed)."""

from __future__ import annotations

import logging

import pytest
from test_methods import gpt2, llama

import dsforget
from dsforget import MaskPlan, ParamRule, PlanError
from dsforget.methods import compose

logging.getLogger("transformers").setLevel(logging.ERROR)


def trained(plan: MaskPlan) -> set[str]:
    return {name for name, rule in plan.rules.items() if rule.trains}


def in_layers(layers: list[int], modules: tuple[str, ...] = ("",)) -> set[str]:
    """The Llama parameters of `layers` whose in-layer path starts with one of `modules`."""
    names = [name for name, _ in llama().named_parameters()]
    return {
        name
        for name in names
        for layer in layers
        for module in modules
        if name.startswith(f"model.layers.{layer}.{module}")
    }


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, in_layers([2, 3])),  # LLaMA-Factory's default: the last 2 layers, every module
        ({"trainable_layers": 1}, in_layers([3])),
        ({"trainable_layers": -3}, in_layers([0, 1, 2])),
        ({"trainable_layers": [0, 2]}, in_layers([0, 2])),
        (
            {"trainable_layers": -1, "trainable_modules": "mlp,self_attn.q_proj"},
            in_layers([0], ("mlp.", "self_attn.q_proj.")),
        ),
        (
            {"trainable_layers": 1, "trainable_modules": ["self_attn"], "extra_modules": "embed_tokens,norm"},
            in_layers([3], ("self_attn.",)) | {"model.embed_tokens.weight", "model.norm.weight"},
        ),
        # patterns alone: no layers unless trainable_layers says so
        (
            {"trainable_patterns": [r"\.down_proj\.", r"^lm_head"]},
            in_layers([0, 1, 2, 3], ("mlp.down_proj",)) | {"lm_head.weight"},
        ),
        ({"trainable_patterns": "lm_head", "trainable_layers": 1}, in_layers([3]) | {"lm_head.weight"}),
    ],
    ids=["default", "last1", "first3", "indices", "modules", "extra", "patterns", "patterns+layers"],
)
def test_freeze_trains_exactly_what_the_options_name(options: dict, expected: set[str]) -> None:
    """LLaMA-Factory's semantics (positive n = last n layers, negative = first |n|, module names
    inside the layers, extra modules outside them) plus regexes; everything else frozen."""
    plan = dsforget.plan_for(llama(4), "freeze", **options)
    assert trained(plan) == expected
    assert all(plan.rules[name].mode == "dense" for name in expected)


def test_freeze_works_on_gpt2_naming() -> None:
    plan = dsforget.plan_for(
        gpt2(3), "freeze", trainable_layers=1, trainable_modules="mlp", extra_modules="ln_f"
    )
    assert trained(plan) == {
        "transformer.h.2.mlp.c_fc.weight",
        "transformer.h.2.mlp.c_fc.bias",
        "transformer.h.2.mlp.c_proj.weight",
        "transformer.h.2.mlp.c_proj.bias",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"trainable_layers": 5}, r"trainable_layers=5 asks for 5 layers; the model has 4"),
        ({"trainable_layers": [0, 9]}, r"trainable_layers=\[0, 9\]: layer 9 is not in 0..3"),
        ({"trainable_layers": "2"}, r"trainable_layers='2' must be an integer"),
        (
            {"trainable_modules": "mpl"},
            r"trainable_modules: no module 'mpl' in the layers; choose from all, input_",
        ),
        (
            {"extra_modules": "head"},
            r"extra_modules: no module 'head' outside the layers; choose from embed_tok",
        ),
        ({"trainable_patterns": ["xyz"]}, r"trainable_patterns: 'xyz' matches no parameter name"),
        ({"trainable_patterns": "("}, r"trainable_patterns: '\(' is not a regex"),
        ({"trainable_modules": "mlp,"}, r"trainable_modules='mlp,' holds an empty name"),
        ({"trainable_layers": 0}, r"freeze: these options train no parameter"),
        ({"trainable_layer": 1}, r"method 'freeze' has no option 'trainable_layer'"),
    ],
)
def test_bad_freeze_options_are_one_line_naming_the_option(options: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message) as error:
        dsforget.plan_for(llama(4), "freeze", **options)
    assert "\n" not in str(error.value)


def test_l2_pulls_every_parameter_and_strength_zero_is_full() -> None:
    model = llama(2)
    plan = dsforget.plan_for(model, "l2", strength=0.5)
    assert set(plan.rules.values()) == {ParamRule("dense", pull=0.5)}
    assert MaskPlan.from_json(plan.to_json()) == plan
    zero = dsforget.plan_for(model, "l2", strength=0)
    assert zero.rules == dsforget.plan_for(model, "full").rules  # no pull, no copy of w0


@pytest.mark.parametrize(
    ("strength", "message"),
    [
        (-0.1, r"strength=-0.1 must be >= 0"),
        (float("inf"), r"strength=inf must be a finite"),
        ("1", r"strength='1'"),
    ],
)
def test_bad_l2_strength_is_named(strength, message: str) -> None:
    with pytest.raises(PlanError, match=f"l2 option {message}"):
        dsforget.plan_for(llama(2), "l2", strength=strength)


def test_baselines_compose_with_the_methods() -> None:
    """freeze+mofo filters what freezing leaves trainable; l2+mofo pulls every entry of a filtered
    parameter; l2+hft pulls HFT's half; a pull never lands on a frozen parameter."""
    model = llama(4)
    freeze = dsforget.plan_for(model, "freeze")
    frozen_mofo = dsforget.plan_for(model, "freeze+mofo", defaults={"fraction": 0.2})
    assert trained(frozen_mofo) == trained(freeze)
    assert frozen_mofo.rules["model.layers.3.mlp.up_proj.weight"] == ParamRule("topk", fraction=0.2)
    l2_mofo = dsforget.plan_for(model, "l2+mofo", strength=2.0, fraction=0.2)
    assert l2_mofo.rules["model.layers.0.mlp.up_proj.weight"] == ParamRule("topk", fraction=0.2, pull=2.0)
    assert l2_mofo.rules["model.norm.weight"] == ParamRule("dense", pull=2.0)
    hft_l2 = dsforget.plan_for(model, "hft+l2", seed=3, strength=2.0)
    assert {rule.pull for rule in hft_l2.rules.values() if rule.trains} == {2.0}
    assert {rule for rule in hft_l2.rules.values() if not rule.trains} == {ParamRule("frozen")}
    with pytest.raises(PlanError, match=r"methods \['l2', 'other'\] both set a pull"):
        compose(
            [dsforget.plan_for(model, "l2"), MaskPlan(dict(dsforget.plan_for(model, "l2").rules), "other")]
        )


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (dict(mode="dense", pull=-1.0), r"pull must be a finite number >= 0, got -1.0"),
        (dict(mode="frozen", pull=1.0), r"pull cannot combine with mode 'frozen'"),
    ],
)
def test_bad_pull_in_a_plan_is_refused(rule: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        ParamRule(**rule)
