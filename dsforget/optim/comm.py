"""The collectives the optimizer itself needs, over DeepSpeed's comm layer.

Kept beside the optimizer (not in dsforget.integration) because an engine built by plain
``deepspeed.initialize`` (Hugging Face Trainer, accelerate) never calls dsforget's integration:
the optimizer then checks the plan and releases DeepSpeed's shared-memory names itself, on its
first step, and it must not import the layer above it to do so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .plan import MaskPlan, PlanError


def is_distributed() -> bool:
    """True when DeepSpeed's process group is up with more than one rank."""
    from deepspeed import comm

    return comm.is_initialized() and comm.get_world_size() > 1


def verify_plan_agreement(plan: MaskPlan) -> None:
    """Raise on every rank unless all ranks hold a plan with the same digest."""
    if not is_distributed():
        return
    from deepspeed import comm

    digests: list[str | None] = [None] * comm.get_world_size()
    comm.all_gather_object(digests, plan.digest)
    differing = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
    if differing:
        raise PlanError(
            f"rank(s) {differing} hold a plan whose digest differs from rank 0's ({digests[0][:12]}); "
            "masks must be identical on every rank: build the plan with dsforget.build_plan, which "
            "chooses it on rank 0 and broadcasts it"
        )


def sum_counts(counts: list[torch.Tensor], group: Any) -> list[torch.Tensor]:
    """Integer counts summed over `group` in one all-reduce (the histograms of exact top-k)."""
    from deepspeed import comm
    from deepspeed.accelerator import get_accelerator

    # NCCL reduces only accelerator tensors; under offload the counts live on the CPU.
    comm_device = torch.device(get_accelerator().current_device_name())
    flat = torch.cat([c.reshape(-1) for c in counts]).to(comm_device)
    comm.all_reduce(flat, group=group)
    pieces = flat.to(counts[0].device).split([c.numel() for c in counts])
    return [piece.view_as(c) for piece, c in zip(pieces, counts, strict=True)]


def shared_memory_buffer(rank: int, env: Mapping[str, str] = os.environ) -> Path:
    """The /dev/shm file of `rank`'s buffer for DeepSpeed's CPU all-reduce (the name that
    deepspeed/ops/csrc/cpu/comm/shm.cpp gives it: uid, MASTER_ADDR, MASTER_PORT, rank)."""
    address, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}"


def release_shared_memory_names() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer once every rank has mapped it.

    On CPU ranks of one host DeepSpeed's comm backend creates a ~66 MiB buffer per rank in
    /dev/shm and never unlinks it, so every run (finished, crashed or killed alike) leaves them
    behind: tmpfs is RAM, and within days /dev/shm fills and later jobs die of SIGBUS. After
    the barrier every rank has mapped every buffer (DeepSpeed's initialisation maps all peers
    before it returns); unlinking the name keeps those mappings, and the memory is freed when
    the last rank exits, however it exits. Collective: every rank calls it after
    init_distributed, and all ranks take the same branch (world size, LOCAL_SIZE and backend
    agree across ranks).
    """
    import deepspeed.comm as dist
    from deepspeed.comm import comm as ds_comm

    if not dist.is_initialized() or getattr(ds_comm.cdb, "shm_comm_op", None) is None:
        return
    world_size = dist.get_world_size()
    if world_size < 2:
        return
    if int(os.environ.get("LOCAL_SIZE", 0)) != world_size:  # shm.cpp's own test: every rank local
        return
    dist.barrier()
    shared_memory_buffer(dist.get_rank()).unlink(missing_ok=True)
