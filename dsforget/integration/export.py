"""Full weights out of a DeepSpeed engine: a CPU state dict on rank 0, and a Hugging Face checkpoint.

Under ZeRO-3 each parameter is gathered on its own (``deepspeed.zero.GatheredParameters``), so
the accelerator never holds more than one full parameter beyond the partitions; rank 0 keeps a
CPU copy. Under ZeRO-0/1/2 every rank already holds the full (16-bit or fp32) parameters.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..atomic import replace_directory


def gather_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """Every parameter and buffer in full, on the CPU of rank 0 (None elsewhere). Collective."""
    import deepspeed
    from deepspeed import comm

    rank = comm.get_rank()
    zero3 = engine.zero_optimization_stage() == 3
    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=zero3):
            if rank == 0:
                state[name] = param.detach().to("cpu", copy=True)
    if rank == 0:
        persistent = engine.module.state_dict().keys()  # keys only: nothing is gathered here
        for name, buffer in engine.module.named_buffers():
            if name in persistent:
                state[name] = buffer.detach().to("cpu", copy=True)
    return state if rank == 0 else None


def save_hf_checkpoint(engine: Any, tokenizer: Any, directory: str | Path) -> Path | None:
    """A ``from_pretrained``-loadable safetensors checkpoint (with tokenizer), written by rank 0
    into `directory`; returns the path on rank 0. Collective.

    Written beside `directory` and swapped in whole (``atomic.replace_directory``): once a model
    was exported, `directory` holds a complete one at every instant, the old until the new is
    durable."""
    from deepspeed import comm

    state = gather_state_dict(engine)
    directory = Path(directory)
    if comm.get_rank() == 0:
        staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        engine.module.save_pretrained(staging, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        replace_directory(staging, directory)
    comm.barrier()
    return directory if comm.get_rank() == 0 else None
