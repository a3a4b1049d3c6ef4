"""The SLURM batch scripts in launch/slurm.

Without SLURM: syntax, documented directives and a dry run (DSFORGET_DRY_RUN=1) whose printed
commands are checked and partly executed. With a real single-node cluster started by the tests
(tests/slurm_cluster.py; `bash tests/install_slurm.sh` installs slurm-wlm and munge): a two-rank
job on the tiny lab, DeepSpeed's launcher under SLURM, and requeues that must resume exactly.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import slurm_cluster
import torch
from launcher import REPO
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

SRUN_SCRIPT = REPO / "launch" / "slurm" / "finetune_srun.sbatch"
DEEPSPEED_SCRIPT = REPO / "launch" / "slurm" / "finetune_deepspeed.sbatch"
SCRIPTS = [SRUN_SCRIPT, DEEPSPEED_SCRIPT]
# arguments that break if a script re-splits or drops them
TRICKY_ARGS = ["--lab_preset", "tiny", "--output_dir", "runs/a b", "--method_options", '{"x": "y z"}']
CPU_JOB = ("--nodes=1", "--gpus-per-node=0", "--time=30")
TRAIN = [
    "--lab_preset",
    "tiny",
    "--micro_batch_size",
    "8",
    "--max_steps",
    "24",
    "--save_every",
    "4",
    "--log_every",
    "1",
    "--eval_max_examples",
    "20",
    "--lr_schedule",
    "constant",
    "--warmup_steps",
    "0",
]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any SLURM job variables (pytest may itself run in a job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    return {**env, **extra}


# ---------------------------------------------------------------- without SLURM


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_script_parses_and_documents_its_directives(script: Path) -> None:
    """Catches a bash syntax error, an #SBATCH line without the comment that explains it, and a
    script that lost its requeue/signal directives or strict mode."""
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = script.read_text().splitlines()
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    for i in directives:
        above = lines[i - 1]
        assert above.startswith("# ") and not above.startswith("#SBATCH"), f"undocumented: {lines[i]}"
    text = script.read_text()
    for needed in ("#SBATCH --requeue", "#SBATCH --signal=USR1@120", "set -euo pipefail"):
        assert needed in text, needed


def fake_scontrol(tmp_path: Path, hosts: list[str]) -> Path:
    """A bin folder whose `scontrol show hostnames` prints `hosts` (and logs its arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(
        f'#!/bin/bash\necho "$@" >>{tmp_path}/scontrol.args\n'
        f'[[ $1 == show && $2 == hostnames ]] && printf "%s\\n" {" ".join(hosts)}\n'
    )
    scontrol.chmod(0o755)
    return bin_dir


def dry_run(script: Path, tmp_path: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    bin_dir = fake_scontrol(tmp_path, ["gpu-a", "gpu-b"])
    job = {
        "DSFORGET_DRY_RUN": "1",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_CPUS_PER_TASK": "8",
        "DSFORGET_PYTHON": "/opt/env/bin/python",
    }
    return subprocess.run(
        ["bash", str(script), *args],
        env=clean_env(**{**job, **env}),
        capture_output=True,
        text=True,
        timeout=60,
    )


def printed_command(output: str, program: str) -> list[str]:
    lines = [line for line in output.splitlines() if line.startswith(program + " ")]
    assert len(lines) == 1, output
    return shlex.split(lines[0])


def test_srun_script_dry_run(tmp_path: Path) -> None:
    """Catches arguments that are dropped or re-split on the way to finetune.py, a master that is not
    the allocation's first node, a port not derived from the job id, and a wrong SLURM-to-torch
    mapping (the printed per-task code is run with a task's SLURM variables)."""
    done = dry_run(SRUN_SCRIPT, tmp_path, TRICKY_ARGS, SLURM_NTASKS="16")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rendezvous gpu-a:14242" in done.stdout  # 10000 + 4242 % 20000
    assert "show hostnames gpu-[a-b]" in (tmp_path / "scontrol.args").read_text()
    words = printed_command(done.stdout, "srun")
    assert "--cpus-per-task=8" in words
    start = words.index("-c")
    per_task, tail = words[start + 1], words[start + 2 :]
    assert tail == ["rank", "/opt/env/bin/python", str(REPO / "launch" / "finetune.py"), *TRICKY_ARGS]
    task = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
    }
    shown = subprocess.run(
        ["bash", "-c", per_task, "rank", "env"], env=clean_env(**task), capture_output=True, text=True
    ).stdout.splitlines()
    for expected in ("RANK=9", "WORLD_SIZE=16", "LOCAL_RANK=1", "LOCAL_WORLD_SIZE=8"):
        assert expected in shown, expected


def test_deepspeed_script_dry_run(tmp_path: Path) -> None:
    """Catches a hostfile without every node or with the wrong slots=, a launcher not told its node
    rank, and arguments lost on the way (the printed per-node code is run with a stand-in python)."""
    done = dry_run(DEEPSPEED_SCRIPT, tmp_path, TRICKY_ARGS, SLURM_GPUS_ON_NODE="8")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hostfile:\ngpu-a slots=8\ngpu-b slots=8\n" in done.stdout
    words = printed_command(done.stdout, "srun")
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1"} <= set(words)
    start = words.index("-c")
    per_node, tail = words[start + 1], words[start + 2 :]
    assert tail == [
        "node",
        "/opt/env/bin/python",
        "--master_addr",
        "gpu-a",
        "--master_port",
        "14242",
        str(REPO / "launch" / "finetune.py"),
        *TRICKY_ARGS,
    ]
    stand_in = tmp_path / "python"  # prints its arguments and the hostfile it was given
    stand_in.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\necho ---\ncat "$4"\n')
    stand_in.chmod(0o755)
    hostfile = "gpu-a slots=8\ngpu-b slots=8\n"
    node = clean_env(SLURM_NODEID="1", DSFORGET_HOSTFILE=hostfile)
    shown = subprocess.run(
        ["bash", "-c", per_node, "node", str(stand_in), *tail[2:]], env=node, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    argv, given_hostfile = shown.stdout.split("---\n")
    assert argv.splitlines()[:3] == ["-m", "deepspeed.launcher.runner", "--hostfile"]
    assert argv.splitlines()[4:] == ["--no_ssh", "--node_rank", "1", *tail[2:]]
    assert given_hostfile == hostfile
    no_gpus = dry_run(DEEPSPEED_SCRIPT, tmp_path / "nogpu", [])
    assert no_gpus.returncode == 2 and "DSFORGET_GPUS_PER_NODE" in no_gpus.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_script_outside_slurm_says_how_to_submit(script: Path) -> None:
    """Catches a script that, run by hand, starts a half-configured job instead of saying what to do."""
    done = subprocess.run(["bash", str(script)], env=clean_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "sbatch" in done.stderr, done.stderr


# ---------------------------------------------------------------- on a local SLURM cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Iterator[slurm_cluster.SlurmCluster]:
    try:
        started = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except slurm_cluster.ClusterUnavailable as err:
        pytest.skip(f"no local SLURM cluster: {err}")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def tiny_lab(lab_cache: Path) -> Path:
    """The tiny lab built once before any job, so ranks do not build it inside the job."""
    subprocess.run(
        [sys.executable, "-m", "dsforget.lab", "--preset", "tiny"],
        env=clean_env(DSFORGET_CACHE=str(lab_cache)),
        check=True,
        capture_output=True,
        timeout=900,
    )
    return lab_cache


def job_env(lab_cache: Path, **extra: str) -> dict[str, str]:
    return clean_env(
        DS_ACCELERATOR="cpu", DSFORGET_CACHE=str(lab_cache), DSFORGET_PYTHON=sys.executable, **extra
    )


def submit_training(cluster: slurm_cluster.SlurmCluster, output: Path, lab_cache: Path) -> int:
    """The srun script on 2 CPU ranks, submitted from the repository root as the README says."""
    return cluster.submit(
        SRUN_SCRIPT,
        *TRAIN,
        "--output_dir",
        str(output),
        sbatch_options=(*CPU_JOB, "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={output}.log"),
        cwd=REPO,
        env=job_env(lab_cache),
    )


def loss_records(output: Path) -> list[tuple[int, str, float]]:
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], key, r[key]) for r in records for key in ("loss", "validation_loss") if key in r]


@pytest.fixture(scope="module")
def straight_run(cluster, tiny_lab: Path, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    output = tmp_path_factory.mktemp("srun") / "straight"
    job = submit_training(cluster, output, tiny_lab)
    return output, cluster.wait(job, timeout=900)


def test_srun_job_trains_on_two_ranks(straight_run) -> None:
    """`sbatch` of the srun script must run finetune.py as one 2-rank job to the end. Catches tasks
    that each start a 1-rank job (world_size 1, two reports racing), a failed rendezvous, and a job
    that ends without its report, checkpoint or exported model."""
    output, record = straight_run
    assert record["ExitCode"] == "0:0"
    log = Path(f"{output}.log").read_text()
    assert f"job {record['JobId']} (restart 0) on" in log and "2 ranks" in log
    report = json.loads((output / "report.json").read_text())
    assert report["train"]["world_size"] == 2 and report["train"]["steps"] == 24
    losses = [value for _, key, value in loss_records(output) if key == "loss"]
    assert len(losses) == 24 and losses[-1] < losses[0]
    assert (output / "checkpoints" / "step24" / "COMPLETE").exists()
    assert (output / "hf_model" / "model.safetensors").exists()


def latest_step(output: Path) -> int | None:
    steps = [int(p.parent.name[4:]) for p in (output / "checkpoints").glob("step*/COMPLETE")]
    return max(steps, default=None)


def test_requeued_job_resumes_to_the_uninterrupted_result(cluster, straight_run, tiny_lab, tmp_path) -> None:
    """`scontrol requeue` after the first checkpoint kills the job mid-training; the requeued job must
    resume from the newest complete checkpoint (not from scratch) and end exactly where the
    uninterrupted job did: same per-step losses (the replayed steps included), same validation loss,
    bit-identical exported weights. Catches a requeue that restarts from step 0 or into a new output
    folder, and a resume that loses data position, RNG or optimizer state."""
    straight, _ = straight_run
    output = tmp_path / "requeued"
    job = submit_training(cluster, output, tiny_lab)
    deadline = time.monotonic() + 900
    while latest_step(output) is None:
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {state} before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 900 s"
        time.sleep(0.2)
    cluster.command("scontrol", "requeue", str(job))
    cluster.wait_requeued(job)  # every process of the first attempt has exited
    interrupted_at = latest_step(output)
    assert interrupted_at < 24 and not (output / "report.json").exists(), "requeued too late: it had finished"
    first_attempt = len(loss_records(output))
    cluster.start_now(job)
    record = cluster.wait(job, timeout=900)
    assert record["Restarts"] == "1" and record["ExitCode"] == "0:0"
    assert "(restart 1)" in Path(f"{output}.log").read_text()

    records = loss_records(output)
    resumed = [step for step, key, _ in records[first_attempt:] if key == "loss"]
    assert resumed[0] == interrupted_at + 1, f"second attempt began at step {resumed[0]}"
    by_step: dict[tuple[int, str], float] = {}
    for step, key, value in records:
        assert by_step.setdefault((step, key), value) == value, f"step {step} replayed differently"
    straight_records = loss_records(straight)
    assert by_step == {(step, key): value for step, key, value in straight_records}
    ours, theirs = (load_file(run / "hf_model" / "model.safetensors") for run in (output, straight))
    differ = [name for name in theirs if not torch.equal(ours[name], theirs[name])]
    assert ours.keys() == theirs.keys() and not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


FAKE_FINETUNE = """
import json, os, sys
from pathlib import Path
import torch, torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank())])
dist.all_reduce(total)
attempt = os.environ.get("SLURM_RESTART_COUNT", "0")
names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")
record = {"env": {n: os.environ.get(n) for n in names}, "argv": sys.argv[1:], "rank_sum": total.item()}
Path(os.environ["FAKE_OUT"], f"rank{dist.get_rank()}-attempt{attempt}.json").write_text(json.dumps(record))
dist.destroy_process_group()
sys.exit(int(os.environ["FAKE_STOP_STATUS"]) if attempt == "0" else 0)
"""


def stand_in_job(cluster, tmp_path: Path, script: Path, sbatch_options: tuple[str, ...], **env: str):
    """Submit `script` with DSFORGET_REPO pointing at a checkout whose finetune.py is FAKE_FINETUNE;
    returns (job id, folder the ranks write to)."""
    fake_repo, out = tmp_path / "repo", tmp_path / "out"
    (fake_repo / "launch").mkdir(parents=True)
    (fake_repo / "launch" / "finetune.py").write_text(FAKE_FINETUNE)
    out.mkdir()
    job_env = clean_env(
        DS_ACCELERATOR="cpu",
        DSFORGET_REPO=str(fake_repo),
        DSFORGET_PYTHON=sys.executable,
        FAKE_STOP_STATUS="75",  # dsforget.train.faults.PREEMPTED_EXIT_CODE
        FAKE_OUT=str(out),
        **env,
    )
    options = (*CPU_JOB, *sbatch_options, f"--output={tmp_path}/job.log")
    return cluster.submit(script, *TRICKY_ARGS, sbatch_options=options, cwd=tmp_path, env=job_env), out


def test_deepspeed_script_starts_a_group_and_requeues_itself_on_the_stop_status(cluster, tmp_path) -> None:
    """The DeepSpeed-launcher script, with a stand-in finetune.py that joins the process group and
    first exits with the "saved and stopped" status 75: the node's 2 ranks must form one group
    (rank sum 1) and get the arguments unchanged, and the job must requeue itself once (the default)
    and then complete. Catches a wrong hostfile or node rank, lost arguments, an exit status lost
    between ranks, launchers and srun, and a script that does not requeue on 75."""
    job, out = stand_in_job(
        cluster, tmp_path, DEEPSPEED_SCRIPT, ("--cpus-per-task=2",), DSFORGET_GPUS_PER_NODE="2"
    )
    cluster.wait_requeued(job)
    cluster.start_now(job)
    record = cluster.wait(job, timeout=300)
    assert record["Restarts"] == "1" and record["ExitCode"] == "0:0"
    log = (tmp_path / "job.log").read_text()
    assert re.search(r"stopped \(status 75\): requeueing job \d+", log), log[-3000:]
    for attempt in (0, 1):
        for rank in (0, 1):
            seen = json.loads((out / f"rank{rank}-attempt{attempt}.json").read_text())
            assert seen["rank_sum"] == 1.0 and seen["env"]["WORLD_SIZE"] == "2"
            assert seen["env"]["RANK"] == str(rank) and seen["env"]["DS_ACCELERATOR"] == "cpu"
            assert seen["argv"] == [f"--local_rank={rank}", *TRICKY_ARGS]


def test_srun_script_reports_the_ranks_status_and_can_leave_requeue_off(cluster, tmp_path) -> None:
    """The srun script with the stand-in finetune.py and DSFORGET_REQUEUE_STATUS empty: the tasks must
    form one 2-rank group with RANK/LOCAL_RANK from SLURM and the arguments unchanged, and the job
    must end FAILED with the ranks' own status 75, not requeued. Catches tasks killed early by
    srun (status 137/143 instead of 75) and a requeue that cannot be switched off."""
    job, out = stand_in_job(
        cluster,
        tmp_path,
        SRUN_SCRIPT,
        ("--ntasks-per-node=2", "--cpus-per-task=1"),
        DSFORGET_REQUEUE_STATUS="",
    )
    record = cluster.wait(job, timeout=300, states=("FAILED",))
    assert record["ExitCode"] == "75:0" and record["Restarts"] == "0"
    assert "requeueing" not in (tmp_path / "job.log").read_text()
    for rank in (0, 1):
        seen = json.loads((out / f"rank{rank}-attempt0.json").read_text())
        assert seen["rank_sum"] == 1.0 and seen["env"]["WORLD_SIZE"] == "2"
        assert seen["env"]["RANK"] == str(rank) and seen["env"]["LOCAL_RANK"] == str(rank)
        assert seen["argv"] == TRICKY_ARGS
