"""Building blocks of the main job (launch/finetune.py): inputs, DeepSpeed config, model, report."""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch

from .data import load_conversations
from .engine import load_deepspeed_config
from .forgetting import EvalSources
from .params import full_shape
from .run_config import RunConfig

logger = logging.getLogger("dsforget")

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model*.safetensors")


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere: one readable log per job."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("dsforget").setLevel(level)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # DeepSpeed 0.19 calls torch collectives that torch 2.13 deprecates, once per step and rank.
    warnings.filterwarnings(
        "ignore",
        message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
        category=FutureWarning,
    )


@dataclass(frozen=True)
class Inputs:
    """Everything the run reads from disk, resolved from the config (the lab or user files)."""

    model_dir: Path
    train_file: Path
    eval_sources: EvalSources


def _read_jsonl(path: str | Path, what: str) -> list[dict]:
    records = []
    try:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(
                            f"{path}:{number}: {what} line is not valid JSON ({err.msg})"
                        ) from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file {path} does not exist") from None
    return records


def check_model_dir(path: str | Path) -> Path:
    """A local Hugging Face checkpoint directory with a config and weights, or a clear error."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"model directory {path} does not exist (dsforget never downloads checkpoints)"
        )
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"model directory {path} has no config.json: is it a Hugging Face checkpoint?"
        )
    if not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise FileNotFoundError(
            f"model directory {path} has no weights (*.safetensors or pytorch_model*.bin)"
        )
    return path


def resolve_inputs(config: RunConfig) -> Inputs:
    limit = config.eval_max_examples
    if config.uses_lab:
        from .lab import LabConfig, build_lab

        lab = build_lab(LabConfig.preset(config.lab_preset))
        task = _task_records(config.eval_data) if config.eval_data else lab.load_task_eval()
        general = read_general_texts(config.general_text) if config.general_text else lab.load_heldout_texts()
        sources = EvalSources(task[:limit], lab.load_facts()[:limit], general[:limit])
        model_dir = check_model_dir(config.init_from) if config.init_from else lab.model_dir
        return Inputs(model_dir, Path(config.data or lab.task_train), sources)
    sources = EvalSources(
        task_records=_task_records(config.eval_data)[:limit] if config.eval_data else [],
        general_texts=read_general_texts(config.general_text)[:limit] if config.general_text else [],
    )
    return Inputs(check_model_dir(config.model), Path(config.data), sources)


def _task_records(path: str) -> list[dict]:
    """Task records checked by the training-data loader (same formats, file:line errors)."""
    return [{"messages": conversation} for conversation in load_conversations(path)]


def read_general_texts(path: str) -> list[str]:
    records = _read_jsonl(path, "general_text")
    for number, record in enumerate(records, start=1):
        if not isinstance(record.get("text"), str):
            raise ValueError(f"{path}: record {number} has no string 'text' field")
    return [record["text"] for record in records]


def resolve_precision(config: RunConfig) -> str:
    from deepspeed.accelerator import get_accelerator

    if config.precision != "auto":
        return config.precision
    accelerator = get_accelerator()
    return "bf16" if accelerator.device_name() != "cpu" and accelerator.is_bf16_supported() else "fp32"


def deepspeed_config(config: RunConfig) -> dict[str, Any]:
    """The DeepSpeed config file, completed with the run's batch sizes, clipping and precision.

    A value the file sets differently from the run config is an error, not a silent override.
    """
    ds = load_deepspeed_config(config.deepspeed)
    precision = resolve_precision(config)
    decided = {  # DeepSpeed key: (run config key, value)
        "train_micro_batch_size_per_gpu": ("micro_batch_size", config.micro_batch_size),
        "gradient_accumulation_steps": ("gradient_accumulation", config.gradient_accumulation),
        "gradient_clipping": ("gradient_clipping", config.gradient_clipping),
    }
    for key, (run_key, value) in decided.items():
        if key in ds and ds[key] != value:
            raise ValueError(
                f"{config.deepspeed} sets {key}={ds[key]} but the run has {run_key}={value}: "
                "set it in one place only"
            )
        ds[key] = value
    if "train_batch_size" in ds:
        raise ValueError(
            f"{config.deepspeed}: remove train_batch_size; it follows from micro_batch_size, "
            "gradient_accumulation and the number of ranks"
        )
    ds["bf16"] = {"enabled": precision == "bf16"}
    if ds.get("fp16", {}).get("enabled"):
        raise ValueError(f"{config.deepspeed} enables fp16; dsforget trains in bf16 or fp32 (--precision)")
    if "scheduler" in ds:
        raise ValueError(f"{config.deepspeed} has a scheduler section; use --lr_schedule and --warmup_steps")
    ds.setdefault("steps_per_print", 10**9)
    return ds


def lr_factor(config: RunConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at each step: linear warm-up, then cosine to 10% or constant.

    (DeepSpeed's own schedulers require at least one warm-up step, so a torch LambdaLR is used.)
    """
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def load_model(model_dir: Path, ds_config: dict[str, Any]) -> torch.nn.Module:
    """The checkpoint as a causal LM; under ZeRO-3 built already partitioned (HfDeepSpeedConfig)."""
    import torch._dynamo  # noqa: F401  imported before zero.Init (see DESIGN.md: a polyfill clash)
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  transformers reads it while loading
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


# Settings a resumed run must share with the run that wrote the checkpoint: they choose the model,
# the plan (resume reads it back from the checkpoint instead of building it) and what the saved
# data position means. The lr, its schedule, max_steps and the outputs may change between attempts.
RESUME_KEYS = (
    "model",
    "lab_preset",
    "init_from",
    "method",
    "method_options",
    "seed",
    "data",
    "max_length",
    "packing",
    "validation_fraction",
    "micro_batch_size",
    "gradient_accumulation",
    "topk",
    "decay_scope",
)
RESUME_KEYS_OF_METHOD = {"mofo": ("fraction",), "cofitune": ("importance_data", "importance_batches")}


def run_identity(config: RunConfig, model: torch.nn.Module) -> dict[str, Any]:
    """What ``checkpoint.check_resume`` compares: RESUME_KEYS (and the method's own keys) and the
    model's parameter names and full shapes, as JSON values."""
    keys = [
        *RESUME_KEYS,
        *(k for part in config.method.split("+") for k in RESUME_KEYS_OF_METHOD.get(part, ())),
    ]
    values = {key: getattr(config, key) for key in keys if hasattr(config, key)}
    if not config.uses_lab:
        values.pop("lab_preset")
    values["parameters"] = {name: list(full_shape(param)) for name, param in model.named_parameters()}
    return json.loads(json.dumps(values))


def environment() -> dict[str, str]:
    """Hardware and versions for the report."""
    import deepspeed
    import transformers
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    device = accelerator.device_name()
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return {
        "device": f"{device}: {name}",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "date": date.today().isoformat(),
    }
