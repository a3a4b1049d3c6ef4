"""Building blocks of the main job (launch/finetune.py): logging, DeepSpeed config, model, schedule,
what a resume must match, and the environment for the report."""

from __future__ import annotations

import json
import logging
import math
import platform
import sys
import warnings
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..integration.ds_config import job_config, resolve_precision
from ..optim.params import full_shape
from .run_config import RunConfig

logger = logging.getLogger("dsforget")


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere: one readable log per job."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", force=True)
    logging.getLogger("dsforget").setLevel(level)
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # six INFO lines per --general_tasks scoring
    # DeepSpeed 0.19 calls torch collectives that torch 2.13 deprecates, once per step and rank.
    warnings.filterwarnings(
        "ignore",
        message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
        category=FutureWarning,
    )


def deepspeed_config(config: RunConfig) -> dict[str, Any]:
    """The run's DeepSpeed config: its --deepspeed file completed from the run (ds_config.job_config)."""
    return job_config(
        config.deepspeed,
        micro_batch_size=config.micro_batch_size,
        gradient_accumulation=config.gradient_accumulation,
        gradient_clipping=config.gradient_clipping,
        precision=resolve_precision(config.precision),
    )


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


def check_attn_implementation(name: str | None, precision_bf16: bool) -> None:
    """Refuse an attention implementation this process cannot run, naming --attn_implementation.

    flash_attention_2 needs the ``flash_attn`` package, a CUDA device and half precision (its
    kernels have no fp32 or CPU version); transformers would otherwise fail deep inside loading or
    the first forward, or cast the attention inputs behind the run's back.
    """
    if name != "flash_attention_2":
        return
    import importlib.util

    from deepspeed.accelerator import get_accelerator

    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "attn_implementation=flash_attention_2 needs the flash_attn package, which is not installed "
            "(pip install flash-attn --no-build-isolation); or use --attn_implementation sdpa"
        )
    device = get_accelerator().device_name()
    if device != "cuda":
        raise ConfigError(
            f"attn_implementation=flash_attention_2 runs on CUDA devices only, this run's accelerator is "
            f"{device!r}: use --attn_implementation sdpa"
        )
    if not precision_bf16:
        raise ConfigError(
            "attn_implementation=flash_attention_2 has no fp32 kernels: use --precision bf16 (or auto on a "
            "GPU with bf16), or --attn_implementation sdpa"
        )


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers 5.25 renamed
    ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``; older 5.x have only the
    first)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_model(
    model_dir: Path,
    ds_config: dict[str, Any],
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """The checkpoint as a causal LM; under ZeRO-3 built already partitioned (HfDeepSpeedConfig).

    `attn_implementation` None leaves transformers' choice (``model.config._attn_implementation``
    says which it made). Gradient checkpointing is non-reentrant (torch's recommended variant: no
    requirement that a layer's inputs need gradients, and ZeRO-3's gather hooks run again in the
    recomputation like any forward).
    """
    # torch._dynamo first imported inside deepspeed.zero.Init fails (its tensor polyfill's signature
    # clashes with zero.Init's patched constructors; torch 2.13, deepspeed 0.19): import it before.
    import torch._dynamo  # noqa: F401
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    bf16 = ds_config["bf16"]["enabled"]
    check_attn_implementation(attn_implementation, bf16)
    dtype = torch.bfloat16 if bf16 else torch.float32
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841  transformers reads it while loading
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **extra)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    logger.info(
        "model: %s, attention %s, gradient checkpointing %s",
        type(model).__name__,
        model.config._attn_implementation,
        "on" if gradient_checkpointing else "off",
    )
    return model


# Settings a resumed run must share with the run that wrote the checkpoint: they choose the model,
# the plan (resume reads it back from the checkpoint instead of building it) and what the saved
# data position means. The lr, its schedule, max_steps and the outputs may change between attempts.
# attn_implementation is compared as the implementation the model loaded with (transformers'
# default resolved): eager, sdpa and flash-attention round differently, so a resumed run would not
# continue the numbers of the one it resumes. gradient_checkpointing is not compared: the
# non-reentrant recomputation runs the same ops on the same inputs, and torch.utils.checkpoint
# restores the RNG state, so dropout draws the same masks (tests/train/test_memory_options.py shows
# equal losses and gradients); turning it on to resume a run that ran out of memory is its main use.
RESUME_KEYS = (
    "model",
    "lab_preset",
    "init_from",
    "method",
    "method_options",
    "seed",
    "data",
    "replay_text",
    "replay_ratio",
    "max_length",
    "packing",
    "validation_fraction",
    "micro_batch_size",
    "gradient_accumulation",
    "topk",
    "decay_scope",
    "attn_implementation",
)
RESUME_KEYS_OF_METHOD = {"mofo": ("fraction",), "cofitune": ("importance_data", "importance_batches")}


def run_identity(config: RunConfig, model: torch.nn.Module) -> dict[str, Any]:
    """What ``checkpoint.check_resume`` compares: RESUME_KEYS (and the method's own keys; the
    attention implementation as the model loaded it) and the model's parameter names and full
    shapes, as JSON values."""
    keys = [
        *RESUME_KEYS,
        *(k for part in config.method.split("+") for k in RESUME_KEYS_OF_METHOD.get(part, ())),
    ]
    values = {key: getattr(config, key) for key in keys if hasattr(config, key)}
    values["attn_implementation"] = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if not config.uses_lab:
        values.pop("lab_preset")
    values["parameters"] = {name: list(full_shape(param)) for name, param in model.named_parameters()}
    return json.loads(json.dumps(values))


def identity_defaults() -> dict[str, Any]:
    """The RESUME_KEYS (and methods' keys) at their RunConfig defaults, as JSON values: what a
    checkpoint written before a setting existed ran with (``checkpoint.check_resume``)."""
    keys = [*RESUME_KEYS, *(key for keys in RESUME_KEYS_OF_METHOD.values() for key in keys)]
    config = RunConfig()
    values = {key: getattr(config, key) for key in keys if hasattr(config, key)}
    values.pop("attn_implementation", None)  # run_identity records the loaded model's, not the flag
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


def apply_hyperparameters(
    optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LambdaLR, config: RunConfig
) -> list[str]:
    """Give a resumed optimizer and schedule this run's lr, betas, eps and weight decay.

    DeepSpeed's load_checkpoint restores the param groups' hyperparameters and the schedule's
    ``base_lrs`` (the peak lr) as they were saved; the run's own values win, and the schedule
    continues from the new peak at the step it reached. Returns what changed, as
    ``"lr 0.001 -> 0.0005"`` lines (empty when nothing did).
    """
    wanted = {"betas": tuple(config.betas), "eps": config.eps, "weight_decay": config.weight_decay}
    changes: dict[str, str] = {}
    for index, group in enumerate(optimizer.param_groups):
        old_peak = schedule.base_lrs[index]
        if old_peak != config.lr:
            changes.setdefault("lr", f"lr {old_peak:g} -> {config.lr:g}")
        for key, value in wanted.items():
            old = tuple(group[key]) if key == "betas" else group[key]
            if old != value:
                changes.setdefault(key, f"{key} {old} -> {value}")
            group[key] = value
        factor = schedule.lr_lambdas[index](schedule.last_epoch)
        group["initial_lr"] = config.lr
        group["lr"] = config.lr * factor
    schedule.base_lrs = [config.lr] * len(optimizer.param_groups)
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
    return list(changes.values())
