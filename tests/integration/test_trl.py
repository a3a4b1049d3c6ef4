"""dsforget.hf.ForgetSFTTrainer: TRL's SFTTrainer with dsforget's optimizer (trl is optional)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from launcher import REPO, run_ranks

WORKER = str(REPO / "tests" / "workers" / "sft_trainer_zero3.py")


def test_missing_trl_names_the_extra(monkeypatch) -> None:
    """Catches dsforget.hf needing trl to import, and a bare ModuleNotFoundError for ForgetSFTTrainer."""
    import importlib.util

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now fails as if it were not installed
    spec = importlib.util.find_spec("dsforget.hf")
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)  # dsforget.hf imported anew, without trl
    assert fresh.ForgetTrainer.__name__ == "ForgetTrainer" and "ForgetSFTTrainer" in dir(fresh)
    with pytest.raises(ImportError, match=r"ForgetSFTTrainer needs TRL.*pip install 'dsforget\[trl\]'"):
        fresh.ForgetSFTTrainer  # noqa: B018
    with pytest.raises(ImportError, match=r"pip install 'dsforget\[trl\]'"):
        from dsforget.hf import ForgetSFTTrainer  # noqa: F401
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        fresh.Nothing  # noqa: B018


@pytest.mark.parametrize("keyword", ["optimizers", "optimizer_cls_and_kwargs"])
def test_forget_sft_trainer_refuses_other_optimizers(keyword: str) -> None:
    """Catches an optimizer handed to SFTTrainer, which transformers drops under DeepSpeed (optimizers=)
    or which create_optimizer would ignore (optimizer_cls_and_kwargs=), being accepted silently."""
    import torch

    from dsforget.hf import ForgetSFTTrainer, ForgetTrainer

    value = {
        "optimizers": (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), None),
        "optimizer_cls_and_kwargs": (torch.optim.SGD, {"lr": 0.1}),
    }[keyword]
    for trainer in (ForgetSFTTrainer, ForgetTrainer):
        with pytest.raises(
            ValueError, match=rf"^{trainer.__name__}: pass make_optimizer= instead of {keyword}"
        ):
            trainer(model=None, make_optimizer=lambda model: None, **{keyword: value})


@pytest.mark.distributed
def test_forget_sft_trainer_under_zero3_on_two_ranks(tmp_path: Path) -> None:
    """The example's chats, tokenizer and Llama in ForgetSFTTrainer under ZeRO-3 on 2 CPU ranks.
    Catches torch's AdamW taking the steps instead of MoFO (transformers swaps it in for an
    optimizer passed as optimizers=; MoFO's matrices would then change in every entry), a step
    MoFO missed, and each rank training alone on all the data (no use_cpu: both see the same)."""
    steps, batch, fraction = 3, 2, 0.1
    out = tmp_path / "rank"
    run_ranks([WORKER, str(out), str(steps), str(batch), str(fraction)], 2)
    ranks = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(2)]
    for result in ranks:
        assert result["world"] == 2 and result["zero3"], result
        assert result["optimizer"] == "MoFOAdamW"
        assert result["global_step"] == steps and result["optimizer_steps"] == [steps], result
        assert len(result["seen"]) == steps * batch
    # each rank its own share of every global batch: no example on both, every one different
    first, second = ({tuple(ids) for ids in result["seen"]} for result in ranks)
    assert len(first) == len(second) == steps * batch and not first & second
    # the update as MoFO dictates: at most `fraction` of a matrix's entries per step (AdamW: all)
    changed, modes = ranks[0]["changed"], ranks[0]["modes"]
    assert changed == ranks[1]["changed"]
    matrices = [name for name, mode in modes.items() if mode == "topk"]
    assert "lm_head.weight" in matrices and "model.layers.0.self_attn.q_proj.weight" in matrices
    for name in matrices:
        assert 0 < changed[name] <= steps * fraction + 1e-6, (name, changed[name])
    dense = [name for name, mode in modes.items() if mode == "dense"]
    assert dense and all(changed[name] > 0.9 for name in dense), {name: changed[name] for name in dense}
