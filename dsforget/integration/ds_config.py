"""Every rule dsforget applies to a DeepSpeed config, in one place.

- what a client optimizer needs under ZeRO and offload, and the setups it cannot run
  (`prepare_config`, applied by dsforget.initialize to any config);
- what the job derives from its run config: batch sizes, clipping and precision written in, and
  a file that contradicts the run refused (`job_config`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputFileError
from ..optim.partitions import UnsupportedSetupError


def load_deepspeed_config(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed JSON config as a dict, without its documentation keys (those starting with "_")."""
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputFileError(f"DeepSpeed config {path} does not exist (--deepspeed)") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"DeepSpeed config {path}: the top level must be a JSON object")
    return {key: value for key, value in config.items() if not key.startswith("_")}


def prepare_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the DeepSpeed config with the keys a client optimizer needs, checked.

    DeepSpeed refuses client optimizers under ZeRO unless ``zero_allow_untested_optimizer`` is
    true, and under optimizer offload unless ``zero_force_ds_cpu_optimizer`` is false; both are
    filled in when absent and rejected when the user set the opposite on purpose.
    """
    if isinstance(config, str | Path):
        config = load_deepspeed_config(config)
    config = copy.deepcopy(dict(config))
    if "optimizer" in config:
        raise ConfigError(
            "the DeepSpeed config has an 'optimizer' section, but dsforget passes its own "
            "optimizer: remove the section"
        )
    if config.get("zero_allow_untested_optimizer") is False:
        raise ConfigError(
            "zero_allow_untested_optimizer is false, but ForgetAdamW is a client optimizer: set it true"
        )
    config["zero_allow_untested_optimizer"] = True
    zero = config.get("zero_optimization", {})
    if config.get("bf16", {}).get("enabled") and zero.get("stage", 0) == 0:
        # DeepSpeed 0.19 then wraps the optimizer in its FP16_UnfusedOptimizer, which keeps its own
        # fp32 copies and steps the optimizer once while it is built, before any layout exists.
        raise UnsupportedSetupError(
            "bf16 without ZeRO (zero_optimization.stage 0) is not supported: use ZeRO stage 1, 2 "
            "or 3 with bf16 (configs/zero2.json), or fp32 (--precision fp32) without ZeRO"
        )
    offload = zero.get("offload_optimizer") or {}
    if offload.get("device", "none") not in ("none", None):
        if offload.get("device") != "cpu":
            raise UnsupportedSetupError(
                f"zero_optimization.offload_optimizer.device={offload.get('device')!r}: "
                "only 'cpu' is supported"
            )
        if offload.get("ratio", 1.0) != 1.0:
            raise UnsupportedSetupError(
                "zero_optimization.offload_optimizer.ratio < 1 needs DeepSpeedCPUAdam"
            )
        if config.get("zero_force_ds_cpu_optimizer") is True:
            raise ConfigError(
                "zero_force_ds_cpu_optimizer is true, which replaces ForgetAdamW by DeepSpeedCPUAdam under "
                "offload: set it false"
            )
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def resolve_precision(requested: str) -> str:
    """ "bf16" or "fp32": `requested` unless it is "auto", which takes bf16 where the accelerator
    supports it (GPUs) and fp32 on CPU ranks."""
    from deepspeed.accelerator import get_accelerator

    if requested != "auto":
        return requested
    accelerator = get_accelerator()
    return "bf16" if accelerator.device_name() != "cpu" and accelerator.is_bf16_supported() else "fp32"


def job_config(
    path: str | Path,
    *,
    micro_batch_size: int,
    gradient_accumulation: int,
    gradient_clipping: float,
    precision: str,
) -> dict[str, Any]:
    """The DeepSpeed config file at `path`, completed with the run's batch sizes, clipping and
    precision ("bf16" or "fp32"). A value the file sets differently from the run is an error
    naming both keys, not a silent override."""
    ds = load_deepspeed_config(path)
    decided = {  # DeepSpeed key: (run config key, value)
        "train_micro_batch_size_per_gpu": ("micro_batch_size", micro_batch_size),
        "gradient_accumulation_steps": ("gradient_accumulation", gradient_accumulation),
        "gradient_clipping": ("gradient_clipping", gradient_clipping),
    }
    for key, (run_key, value) in decided.items():
        if key in ds and ds[key] != value:
            raise ConfigError(
                f"{path} sets {key}={ds[key]} but the run has {run_key}={value}: set it in one place only"
            )
        ds[key] = value
    if "train_batch_size" in ds:
        raise ConfigError(
            f"{path}: remove train_batch_size; it follows from micro_batch_size, "
            "gradient_accumulation and the number of ranks"
        )
    ds["bf16"] = {"enabled": precision == "bf16"}
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path} enables fp16; dsforget trains in bf16 or fp32 (--precision)")
    if "scheduler" in ds:
        raise ConfigError(f"{path} has a scheduler section; use --lr_schedule and --warmup_steps")
    ds.setdefault("steps_per_print", 10**9)
    return ds


__all__ = [
    "UnsupportedSetupError",
    "job_config",
    "load_deepspeed_config",
    "prepare_config",
    "resolve_precision",
]
