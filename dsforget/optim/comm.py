"""The collectives the optimizer itself needs, over DeepSpeed's comm layer.

Kept beside the optimizer (not in dsforget.integration) because an engine built by plain
``deepspeed.initialize`` (Hugging Face Trainer, accelerate) never calls dsforget's integration:
the optimizer then checks the plan and releases DeepSpeed's shared-memory names itself, on its
first step, and it must not import the layer above it to do so.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Mapping
from datetime import timedelta
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


_teardown_registered = False

# How long the exit hook's barrier waits for the other ranks. It is there to release the GIL while
# this rank's gloo workers finish (microseconds of work), not to make ranks agree, so a rank that
# is still busy (rank 0 saving a model) is not waited for: the hook goes on after this.
EXIT_BARRIER_TIMEOUT = timedelta(seconds=10)


def close_process_group_at_exit() -> None:
    """Register (once) the ``atexit`` hook that lets gloo's worker threads finish before the
    interpreter is finalised, then destroys the process group.

    The abort it prevents (issue 15 item 13): after a collective completes, the gloo worker thread
    that ran it still drops its reference to the work's tensors, and for a tensor Python also
    references (DeepSpeed's all-gather buffers) that needs the GIL (torch's PyObject
    preservation). When the script returns while the worker waits for the GIL, Python 3.11's
    finalisation ends the thread with ``pthread_exit``, whose unwinding through the work's
    ``noexcept`` destructor calls ``std::terminate``: "terminate called without an active
    exception", SIGABRT, status 250 from the deepspeed launcher. Seen in a core dump: the aborting
    thread is in ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllgatherWork`` -> ``decref`` ->
    ``take_gil`` -> ``PyThread_exit_thread``, holding its group's work mutex, while the main
    thread is in ``Py_FinalizeEx``. ``destroy_process_group`` alone does not help: gloo's shutdown
    does not stop its workers, and DeepSpeed keeps the groups alive.

    Two barriers on every gloo group are meant to close that window (torch's ``ProcessGroupGloo::runLoop``:
    a worker drops its work at the end of a loop iteration, holding the group's work mutex, in the
    same lock hold in which it clears the work from ``workInProgress_``). The first barrier
    snapshots, under that mutex, every work queued or in progress, and waits for each through a
    weak reference before it completes: a work it still holds a reference to is dropped by the
    barrier's own worker, before the barrier completes, while this thread waits with the GIL
    released. A work whose worker dropped it first is dropped under the mutex, which the second
    barrier's enqueue takes (GIL released): when it returns, no worker is dropping a work that
    holds tensors. (One barrier left a worker that had not yet taken the mutex free to drop its
    work after the barrier completed: 1 abort in 8 runs under load.) Measured with two: 1 abort in
    40 runs under load, so some path this reasoning misses remains (issue 15 item 13; the failing
    run's whole output is what tests/workers/repeat_user_exit.py N DIR keeps). Skipped when the
    script ends on an uncaught exception: the other ranks may be inside a collective that a barrier
    would collide with, and the launcher stops them once this rank exits. A script that destroys
    the group itself is left alone.
    """
    global _teardown_registered
    if _teardown_registered:
        return
    _teardown_registered = True
    atexit.register(close_process_group)


def close_process_group() -> None:
    """Let every gloo worker thread finish, then destroy the process group (a no-op when there is
    none). Call it on every rank at the end of a script that ends normally. ``dsforget.initialize``
    and ForgetAdamW's first step (any engine, or none: Hugging Face Trainer, TRL) register it at
    exit; ``launch/finetune.py`` calls it itself. Why the barriers: see
    ``close_process_group_at_exit``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if getattr(sys, "last_exc", None) is None and getattr(sys, "last_value", None) is None:
        for group in _gloo_groups():
            try:
                for _ in range(2):
                    dist.barrier(group=group, timeout=EXIT_BARRIER_TIMEOUT)
            except Exception:  # noqa: BLE001 - a rank already gone or still busy: the wait was the point
                pass
    dist.destroy_process_group()


def _gloo_groups() -> list[Any]:
    """The gloo process groups this rank belongs to, in creation order (the same on every rank, so
    the barriers cannot cross)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    # torch has no public list of the groups; its registry holds DeepSpeed's clones of the world
    # group as well as the default one
    registry = getattr(getattr(distributed_c10d, "_world", None), "pg_names", None)
    groups = list(registry) if registry else [dist.group.WORLD]
    return [
        group
        for group in groups
        if group is not dist.GroupMember.NON_GROUP_MEMBER and dist.get_backend(group) == dist.Backend.GLOO
    ]
