"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd from a temporary folder.

Needs Debian's ``slurm-wlm`` and ``munge`` (``bash tests/install_slurm.sh``) and root (slurmd
starts job steps as the submitting user). Everything the daemons write lives in the folder: key,
sockets, state, spool, logs and pid files; ports are free ones, so a system SLURM or a second test
session on the same host is left alone. :func:`start` raises :class:`ClusterUnavailable` with the
reason (and the daemon's log tail) when the cluster cannot run; :meth:`SlurmCluster.stop` stops
the daemons by their pid files.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "sinfo")
# finished jobs stay visible to `scontrol show job` this long (s); tests read their final state
MIN_JOB_AGE = 600
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
# seconds between SIGTERM and SIGKILL when a job is requeued or cancelled
KILL_WAIT = 15


class ClusterUnavailable(RuntimeError):
    """SLURM cannot run here; the message says why (for pytest.skip)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} was not written)"


@dataclass
class SlurmCluster:
    root: Path
    node: str
    cpus: int

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for sbatch/srun/scontrol: this cluster's config."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def command(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done.stdout

    def submit(
        self,
        script: str | Path,
        *args: str,
        sbatch_options: tuple[str, ...] = (),
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> int:
        """sbatch the script from `cwd` with `env` (arguments after it go to the script); the job id."""
        done = subprocess.run(
            ["sbatch", "--parsable", *sbatch_options, str(script), *args],
            env={**(os.environ if env is None else env), "SLURM_CONF": str(self.conf)},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"sbatch failed ({done.returncode}): {done.stdout}{done.stderr}")
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as key/value pairs (JobState, ExitCode, Restarts, StdOut, ...)."""
        text = self.command("scontrol", "show", "job", str(job_id), "--oneliner")
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: int, timeout: float, states: tuple[str, ...] = ("COMPLETED",)) -> dict[str, str]:
        """Poll until the job reaches a final state; returns its record (raises on timeout or
        a final state not in `states`, with the job's log tail)."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            state = record.get("JobState", "")
            if state in FINISHED:
                if state not in states:
                    raise RuntimeError(f"job {job_id} ended {state}: {record}\n{self.log_tail(record)}")
                return record
            if time.monotonic() > deadline:
                self.command("scancel", str(job_id), check=False)
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s\n{self.log_tail(record)}")
            time.sleep(1)

    def wait_requeued(self, job_id: int, restarts: int = 1, timeout: float = 300) -> dict[str, str]:
        """Poll until the job has been requeued `restarts` times and is back in the queue (PENDING,
        every process of the previous attempt gone)."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            if record.get("JobState") == "PENDING" and int(record.get("Restarts", 0)) >= restarts:
                return record
            if record.get("JobState") in FINISHED or time.monotonic() > deadline:
                raise RuntimeError(
                    f"job {job_id} is {record.get('JobState')} after {record.get('Restarts')} restarts, "
                    f"not requeued\n{self.log_tail(record)}"
                )
            time.sleep(0.5)

    def start_now(self, job_id: int) -> None:
        """A requeued job waits ~2 minutes (Reason=BeginTime) before it may run again; skip that.

        Not at once: slurmd revokes the old credential with a 1-second resolution, and a restart
        within that second is refused ("Job credential revoked") and ends the job FAILED.
        """
        time.sleep(2)
        self.command("scontrol", "update", f"jobid={job_id}", "StartTime=now")

    def log_tail(self, record: dict[str, str], lines: int = 40) -> str:
        return f"--- {record.get('StdOut')} ---\n" + _tail(Path(record.get("StdOut", "")), lines)

    def stop(self) -> None:
        """Stop the daemons by their pid files (slurmd first, munged last)."""
        for name in reversed(DAEMONS):
            pid_file = self.root / f"{name}.pid"
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def missing_programs() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]


def _write_config(root: Path, node: str, cpus: int) -> None:
    state, spool = root / "state", root / "spool"
    state.mkdir()
    spool.mkdir()
    lines = [
        "ClusterName=dsforgettest",
        f"SlurmctldHost={node}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge.socket'}",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        f"StateSaveLocation={state}",
        f"SlurmdSpoolDir={spool}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "JobRequeue=1",
        "ReturnToService=2",
        f"MinJobAge={MIN_JOB_AGE}",
        f"KillWait={KILL_WAIT}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
        f"PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    (root / "slurm.conf").write_text("\n".join(lines) + "\n")


def _start_daemon(root: Path, argv: list[str], env: dict[str, str], log: Path) -> None:
    name = Path(argv[0]).name
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise ClusterUnavailable(
            f"{name} did not start ({done.returncode}): {done.stdout}{done.stderr}\n{_tail(log)}"
        )
    deadline = time.monotonic() + 20
    while not (root / f"{name}.pid").exists():
        if time.monotonic() > deadline:
            raise ClusterUnavailable(f"{name} wrote no pid file within 20 s:\n{_tail(log)}")
        time.sleep(0.2)


def start(root: Path, cpus: int | None = None) -> SlurmCluster:
    """Start munged, slurmctld and slurmd in `root` and wait until the node is idle."""
    missing = missing_programs()
    if missing:
        raise ClusterUnavailable(
            f"SLURM is not installed ({', '.join(missing)} missing): "
            "run `bash tests/install_slurm.sh` as root"
        )
    if os.geteuid() != 0:
        raise ClusterUnavailable("a local SLURM cluster needs root (slurmd runs jobs as their user)")
    node = socket.gethostname().split(".")[0]
    cpus = cpus or os.cpu_count() or 1
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)  # munged refuses a key or socket in a folder others may write to
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    _write_config(root, node, cpus)
    cluster = SlurmCluster(root, node, cpus)
    env = cluster.env
    try:
        _start_daemon(
            root,
            [
                "munged",
                "--force",  # as root, and /tmp's sticky-bit parent is accepted with a warning
                f"--key-file={key}",
                f"--socket={root / 'munge.socket'}",
                f"--pid-file={root / 'munged.pid'}",
                f"--log-file={root / 'munged.log'}",
                f"--seed-file={root / 'munged.seed'}",
            ],
            env,
            root / "munged.log",
        )
        _start_daemon(root, ["slurmctld", "-c"], env, root / "slurmctld.log")  # -c: no saved state
        _start_daemon(root, ["slurmd", "-N", node], env, root / "slurmd.log")
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            done = subprocess.run(
                ["sinfo", "--noheader", "--format=%t"], env=env, capture_output=True, text=True, timeout=30
            )
            state = done.stdout.strip() + done.stderr.strip()
            if state == "idle":
                return cluster
            time.sleep(0.5)
        raise ClusterUnavailable(
            f"node {node} not idle after 60 s (sinfo: {state!r})\n"
            f"slurmctld.log:\n{_tail(root / 'slurmctld.log')}\nslurmd.log:\n{_tail(root / 'slurmd.log')}"
        )
    except BaseException:
        cluster.stop()
        raise
