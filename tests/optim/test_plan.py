"""MaskPlan, method plans, layouts and DeepSpeed config preparation (no distributed run)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import dsforget
from dsforget import MaskPlan, ParamRule, PlanError
from dsforget.methods import compose


class ScaleNorm(nn.Module):
    """A norm whose parameter name says nothing: only its class marks it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))


def model() -> nn.Module:
    return nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 6), ScaleNorm(6), nn.Linear(6, 11, bias=False))


def test_mofo_plan_exempts_biases_and_norms_by_name_and_class() -> None:
    plan = dsforget.plan_for(model(), "mofo", fraction=0.1)
    modes = {name: rule.mode for name, rule in plan.rules.items()}
    assert modes == {
        "0.weight": "topk",
        "1.weight": "topk",
        "1.bias": "dense",
        "2.scale": "dense",
        "3.weight": "topk",
    }
    assert plan.rules["0.weight"].fraction == 0.1


def test_plan_json_round_trip_keeps_digest() -> None:
    plan = dsforget.plan_for(model(), "mofo", fraction=0.15)
    plan = MaskPlan({**plan.rules, "1.weight": ParamRule("topk", 0.15, row_scale=(0.5,) * 6)}, method="mofo")
    again = MaskPlan.from_json(plan.to_json())
    assert again == plan and again.digest == plan.digest
    changed = MaskPlan({**plan.rules, "3.weight": ParamRule("dense")}, method="mofo")
    assert changed.digest != plan.digest


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["params"]["1.weight"].update(mode="sparse"),
            r"params\['1.weight'\]: rule mode 'sparse' is unknown",
        ),
        (
            lambda d: d["params"]["1.weight"].update(fraction=0),
            r"params\['1.weight'\]: topk fraction must be in",
        ),
        (
            lambda d: d["params"]["1.weight"].update(fraction=1.01),
            r"topk fraction must be in \(0, 1\], got 1.01",
        ),
        (
            lambda d: d["params"]["1.bias"].update(fraction=0.5),
            r"fraction is only meaningful with mode 'topk'",
        ),
        (lambda d: d["params"]["1.weight"].update(colour=1), r"unknown key\(s\) \['colour'\]"),
        (lambda d: d["params"]["1.bias"].pop("mode"), r"params\['1.bias'\]: missing key 'mode'"),
        (lambda d: d.update(format_version=7), r"format_version 7 is not supported"),
        (
            lambda d: d["params"]["1.weight"].update(frozen_rows=[[2, 4], [3, 5]]),
            r"params\['1.weight'\]: frozen_rows must be sorted, non-empty, non-overlapping",
        ),
        (
            lambda d: d["params"]["1.bias"].update(mode="frozen", frozen_rows=[[0, 1]]),
            r"frozen_rows cannot combine with mode 'frozen'",
        ),
        (lambda d: d["params"]["1.weight"].update(frozen_rows=[[0]]), r"params\['1.weight'\]: not enough"),
    ],
)
def test_bad_plan_files_name_the_parameter_and_key(edit, message: str, tmp_path) -> None:
    data = dsforget.plan_for(model(), "mofo").to_dict()
    edit(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=message):
        MaskPlan.load(path)


def test_plan_checked_against_the_model() -> None:
    named = [(n, tuple(p.shape)) for n, p in model().named_parameters()]
    plan = dsforget.plan_for(model(), "mofo")
    plan.check_parameters(named)
    with pytest.raises(PlanError, match=r"names 1 parameter\(s\) the model lacks, e.g. \['ghost.weight'\]"):
        MaskPlan({**plan.rules, "ghost.weight": ParamRule("dense")}).check_parameters(named)
    with pytest.raises(PlanError, match=r"has no rule for 1 parameter\(s\), e.g. \['3.weight'\]"):
        MaskPlan({k: v for k, v in plan.rules.items() if k != "3.weight"}).check_parameters(named)
    with pytest.raises(
        PlanError, match=r"params\['1.weight'\].row_scale has 2 values but the parameter has 6 rows"
    ):
        MaskPlan({**plan.rules, "1.weight": ParamRule("dense", row_scale=(1.0, 1.0))}).check_parameters(named)
    with pytest.raises(
        PlanError, match=r"params\['1.weight'\].frozen_rows reach row 7 but the parameter has 6"
    ):
        MaskPlan({**plan.rules, "1.weight": ParamRule("dense", frozen_rows=((5, 7),))}).check_parameters(
            named
        )


def test_frozen_rows_round_trip_compose_and_count_in_the_trainable_share() -> None:
    """Catches frozen rows lost in plan.json (a resumed run would train them), dropped when HFT
    composes with MoFO or CoFiTune, or counted as trained."""
    rules = {"0.weight": ParamRule("dense", frozen_rows=((0, 2), (4, 6))), "1.weight": ParamRule("frozen")}
    plan = MaskPlan(rules, method="hft")
    again = MaskPlan.from_json(plan.to_json())
    assert again == plan and again.digest == plan.digest
    other = MaskPlan(
        {"0.weight": ParamRule("topk", 0.5, frozen_rows=((1, 3),)), "1.weight": ParamRule("dense")}
    )
    merged = compose([plan, other])["0.weight"]
    assert merged == ParamRule("topk", 0.5, frozen_rows=((0, 3), (4, 6)))
    assert plan.trainable_share([("0.weight", (8, 3)), ("1.weight", (8, 3))]) == 4 / 16


def test_unknown_method_lists_the_known_ones() -> None:
    known = "cofitune, freeze, full, hft, l2, lora, mofo"
    with pytest.raises(PlanError, match=f"unknown 'moffo'; available: {known}"):
        dsforget.plan_for(model(), "moffo")
    with pytest.raises(PlanError, match="method 'mofo' has no option 'fractoin'; its options: filter_biases"):
        dsforget.plan_for(model(), "mofo", fractoin=0.1)


def test_import_and_step_without_deepspeed_or_triton() -> None:
    """A login node or CPU box without DeepSpeed or Triton can import dsforget and step the optimizer."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['deepspeed'] = None\n"
        "import torch, dsforget\n"
        "w = torch.nn.Parameter(torch.randn(5, 4)); opt = dsforget.MoFOAdamW([('w', w)], fraction=0.5)\n"
        "before = w.detach().clone(); w.grad = torch.randn(5, 4); opt.step()\n"
        "print(int((w != before).sum()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "10"
