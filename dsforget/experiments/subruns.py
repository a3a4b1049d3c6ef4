"""Drivers that run launch/finetune.py several times (compare, continual stages, searches).

Each run is its own DeepSpeed job in a subprocess: DeepSpeed cannot change the trainable set of
an engine, and a fresh process per run also frees every rank's memory between runs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

FINETUNE = Path(__file__).resolve().parents[2] / "launch" / "finetune.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def local_accelerator() -> str:
    """DS_ACCELERATOR, else "cuda" where nvidia-smi exists and "cpu" elsewhere (as the Makefile)."""
    return os.environ.get("DS_ACCELERATOR") or ("cuda" if shutil.which("nvidia-smi") else "cpu")


def subrun_env() -> dict[str, str]:
    """The environment of a finetune subprocess: this one, with the accelerator made explicit."""
    return {**os.environ, "DS_ACCELERATOR": local_accelerator()}


def finetune_command(num_gpus: int | None, *flags: str) -> list[str]:
    """`deepspeed [--num_gpus N] --master_port P launch/finetune.py FLAGS`: all GPUs, or 2 CPU
    ranks without one. A free port, not DeepSpeed's fixed 29500, so that runs beside another
    job on the same host do not join its rendezvous."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    cpu = local_accelerator() == "cpu"
    ranks = ["--num_gpus", str(num_gpus or 2)] if (cpu or num_gpus) else []
    return [launcher, *ranks, "--master_port", str(free_port()), str(FINETUNE), *flags]


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the driver's own flags, the flags after `--` that go to every finetune run)."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1 :]


def previous_run(run_dir: Path, flags: list[str]) -> str | None:
    """What `run_dir` holds for a finetune run with `flags`: None (no run), "started" (same
    settings, not finished: the run resumes) or "finished" (same settings, report.json written).
    Raises ConfigError naming the settings that differ when it holds a run made with others."""
    from ..errors import ConfigError
    from ..train.run_config import RunConfig, parse_run_config

    saved_file = run_dir / "config.json"
    if not saved_file.exists():
        return None
    saved = json.loads(saved_file.read_text())
    wanted = json.loads(json.dumps(parse_run_config(flags).to_dict()))
    # A setting added after the run was made (absent from its config.json) had its default's effect
    defaults = json.loads(json.dumps(RunConfig().to_dict()))
    saved = {**defaults, **saved}
    differing = sorted(key for key in set(saved) | set(wanted) if saved.get(key) != wanted.get(key))
    if differing:
        details = ", ".join(f"{key}={saved.get(key)!r} there, {wanted.get(key)!r} here" for key in differing)
        raise ConfigError(
            f"{run_dir} holds a run made with other settings ({details}): pass another --output_dir, "
            f"or delete {run_dir} to run it again"
        )
    return "finished" if (run_dir / "report.json").exists() else "started"
