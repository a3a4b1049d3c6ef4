"""The main job's configuration: precedence, named errors, the DeepSpeed config it completes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dsforget.train.inputs import check_model_dir
from dsforget.train.job import deepspeed_config, lr_factor
from dsforget.train.run_config import RunConfig, parse_run_config


def test_flags_override_the_file_which_overrides_defaults(tmp_path: Path) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text("lr: 0.0002\nmethod: full\nbetas: [0.9, 0.95]\npacking: true\n")
    config = parse_run_config(["--config", str(config_file), "--lr", "3e-4", "--no-packing"])
    assert (config.lr, config.method, config.betas, config.packing) == (3e-4, "full", (0.9, 0.95), False)
    assert config.micro_batch_size == RunConfig().micro_batch_size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("frction: 0.1\n", r"run.yaml: unknown key 'frction'; did you mean 'fraction'\?"),
        ("fraction: 2\n", r"fraction=2 must be in \(0, 1\]"),
        ("micro_batch_size: 0\n", r"micro_batch_size=0 must be >= 1"),
        ("topk: global\n", r"topk='global' is not allowed; choose one of exact, shard"),
        ("model: /ckpt/llama\n", r"data: a training file is required when model is a checkpoint directory"),
        ("- a\n- b\n", r"the top level must be a mapping"),
    ],
)
def test_bad_config_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_run_config(["--config", str(config_file)])


def test_unknown_flag_is_an_error() -> None:
    with pytest.raises(ValueError, match="command line: unknown key 'warmup'; did you mean 'warmup_steps'"):
        parse_run_config(["--warmup", "5"])


def write_ds(tmp_path: Path, values: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"_usage": "documentation key", **values}))
    return str(path)


def test_deepspeed_config_is_completed_from_the_run(tmp_path: Path) -> None:
    path = write_ds(tmp_path, {"zero_optimization": {"stage": 3}})
    ds = deepspeed_config(
        RunConfig(deepspeed=path, micro_batch_size=4, gradient_accumulation=2, precision="fp32")
    )
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"] == {"enabled": False} and "_usage" not in ds


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"train_micro_batch_size_per_gpu": 4},
            r"sets train_micro_batch_size_per_gpu=4 but the run has micro_batch_size=8",
        ),
        ({"train_batch_size": 64}, r"remove train_batch_size"),
        ({"scheduler": {"type": "WarmupLR"}}, r"has a scheduler section; use --lr_schedule"),
        ({"fp16": {"enabled": True}}, r"enables fp16"),
    ],
)
def test_deepspeed_config_contradicting_the_run_is_refused(
    tmp_path: Path, values: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        deepspeed_config(RunConfig(deepspeed=write_ds(tmp_path, values), precision="fp32"))


def test_lr_schedule_warms_up_then_decays_to_a_tenth() -> None:
    factor = lr_factor(RunConfig(warmup_steps=4, lr_schedule="cosine"), total_steps=104)
    assert [round(factor(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert factor(4) == 1.0 and math.isclose(factor(104), 0.1)
    constant = lr_factor(RunConfig(warmup_steps=0, lr_schedule="constant"), total_steps=10)
    assert [constant(s) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]


def test_model_directory_errors_say_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist \(--model; dsforget never downloads"):
        check_model_dir(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has no weights \(\*.safetensors or pytorch_model\*.bin\)"):
        check_model_dir(tmp_path)
