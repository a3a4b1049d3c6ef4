"""How a run ends when it is preempted, loses a rank, or meets non-finite gradients.

**Preemption.** While ``Trainer.fit`` runs, SIGTERM (``scancel``, a SLURM time limit, Kubernetes
eviction, a launcher passing its own SIGTERM on) and SIGUSR1 (SLURM's early warning,
``sbatch --signal=USR1@120``) do not kill a rank: the handler only notes the signal. After every
optimizer step the ranks sum a one-element flag (one all-reduce of 4 bytes per step), so all of
them stop after the same step even when only some got the signal. They save a checkpoint through
the usual path and exit with ``PREEMPTED_EXIT_CODE``; the next start with the same output_dir
resumes from it (``--resume auto``). The save has to fit in the sender's grace period.

What each launcher does with the signal (deepspeed 0.19, torch 2.13, read from their code):

- ``deepspeed`` on one node: the per-node ``deepspeed.launcher.launch`` process catches SIGTERM
  and SIGINT and sends SIGTERM to its ranks one after another (each gets up to 30 s, then
  SIGKILL), then exits with status 1 whatever the ranks returned. The ranks agree, save and
  exit with 75 on their own, even those that are signalled last. The ``deepspeed`` command above
  it installs no handler on one node: signal the whole process group (``kill -TERM -PGID``, as
  SLURM and Ctrl-C do) or the ranks. SIGUSR1 kills the launcher (no handler) and reaches the
  ranks only when sent to them. When a rank exits non-zero (75 included), the launcher sends
  SIGTERM to the others and exits with that status.
- ``torchrun``: catches SIGTERM, SIGINT, SIGHUP and SIGQUIT, sends SIGTERM to the workers, gives
  them 30 s, then SIGKILL. SIGUSR1 kills it unless listed in TORCHELASTIC_SIGNALS_TO_HANDLE.
- ``srun``: ``scancel`` and the time limit send SIGTERM to every task, then SIGKILL after the
  cluster's KillWait (30 s by default); ``--signal=USR1@120`` warns every task 120 s before the
  limit, ``--signal=B:USR1@120`` only the batch shell (which must pass it on). A batch script
  can requeue on this status: ``srun ...; [ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID``.
- ``mpirun`` (Open MPI, per its manual): passes SIGUSR1 and SIGUSR2 on to every rank; on SIGTERM
  or SIGINT it sends SIGTERM to every rank and SIGKILL a few seconds later, which is too short
  for a large checkpoint: ask for SIGUSR1 first.

**A lost rank.** A rank that dies closes its sockets, so gloo fails the others' next collective
at once ("Connection reset by peer"); a rank that hangs makes them wait until the process group
timeout. Neither message says which rank. ``comm_timeout`` sets that timeout on every process
group for the duration of training: DeepSpeed's ZeRO-1/2 data-parallel group is created with
torch's default (30 min on gloo, 10 on NCCL) whatever ``deepspeed.init_distributed(timeout=)``
says. After a failed collective each surviving rank posts a key to the rendezvous store and
waits ``REPORT_WAIT_S`` for the others' keys; the ranks whose keys never come are named in the
``LostRankError``. Launchers act too: the deepspeed launcher and torchrun stop the remaining
ranks once one exits non-zero (SIGTERM, SIGKILL after 30 s); torchrun and Open MPI's mpirun name
the failed rank, srun names the task (and with ``--kill-on-bad-exit=1`` stops the others).

**Non-finite gradients.** With ZeRO-1/2/3 (fp32 or bf16, offload too) DeepSpeed 0.19 already
skips a step whose global gradient norm is inf or NaN: parameters, optimizer state and the lr
schedule stay as they are, and every rank agrees because the norm is all-reduced; the engine
reports it through ``was_step_applied()``. Without ZeRO in fp32 the engine hands the step to
ForgetAdamW unguarded, so ``NonFiniteGuard`` skips it there, lr schedule included.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, NoReturn

import torch

logger = logging.getLogger("dsforget")

# EX_TEMPFAIL from sysexits.h, "temporary failure; the user is invited to retry": a checkpoint
# was saved after a stop signal and the same command resumes from it.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# How long a rank that saw a collective fail waits for the other ranks to report in before
# naming the silent ones. Survivors of a killed rank fail within milliseconds of each other.
REPORT_WAIT_S = 5.0
# Substrings of the errors gloo and NCCL raise when a peer is gone or a collective timed out
# (torch 2.13 raises them as plain RuntimeError, not DistError).
_COMM_FAILURE_MARKS = (
    "gloo",
    "NCCL",
    "Connection reset",
    "Connection closed",
    "Connection refused",
    "Broken pipe",
    "Timed out",
    "timed out",
    "pair closure",
)


class LostRankError(RuntimeError):
    """A collective failed or timed out because another rank died, hung or lost its network."""


class NonFiniteGradientError(RuntimeError):
    """Too many optimizer steps in a row had inf or NaN gradients."""


class WaitTimeoutError(RuntimeError):
    """A rank waited longer than its bound for another rank to finish a phase."""


# --- preemption ------------------------------------------------------------------------------


class StopSignals:
    """While active (a context manager), SIGTERM and SIGUSR1 only note that a stop was asked for.

    Handlers are installed on entry and the previous ones restored on exit; Python runs them in
    the main thread between bytecodes, so a rank blocked in a collective sees the signal once
    the collective returns. Outside the main thread nothing is installed (a warning says so).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        # Only a flag: logging from a handler can interleave with the line being written.
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("stop signals are not handled: training does not run in the main thread")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def any_rank(flag: bool, device: torch.device | str, world: int) -> bool:
    """True on every rank when `flag` is true on any rank (collective: all ranks call it together)."""
    if world == 1:
        return flag
    from deepspeed import comm

    total = torch.tensor([1.0 if flag else 0.0], device=device)
    comm.all_reduce(total)  # a sum: > 0 when any rank's flag is set
    return bool(total.item() > 0)


def exit_preempted() -> NoReturn:
    """End this rank after its preemption checkpoint with status ``PREEMPTED_EXIT_CODE``.

    Leaves through ``os._exit`` after closing the process group and flushing logs: interpreter
    teardown after ZeRO-3 on CPU ranks sometimes aborts in native code (tests/workers/
    train_tiny.py), which would turn 75 into 134 and make a requeue script see a crash.
    """
    from deepspeed import comm

    if comm.is_initialized():
        comm.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(PREEMPTED_EXIT_CODE)


# --- lost ranks ------------------------------------------------------------------------------


def _process_groups() -> list[Any]:
    """Every process group of this process: the world and those DeepSpeed created."""
    from torch.distributed import distributed_c10d

    world = getattr(distributed_c10d, "_world", None)  # no public list of groups in torch 2.13
    return list(getattr(world, "pg_map", None) or [])


def _timeout_of(group: Any) -> timedelta | None:
    for device in getattr(group, "_device_types", ()):
        try:
            return group._get_backend(device).options._timeout
        except (AttributeError, RuntimeError):
            continue
    return None


def bound_process_groups(seconds: float) -> list[tuple[Any, timedelta]]:
    """Every existing process group's collectives fail after `seconds` (0: unchanged); returns
    each changed group with its previous timeout. Groups created later keep torch's default
    (30 min on gloo, 10 on NCCL): call it again after ``deepspeed.initialize``, which creates
    the ZeRO groups."""
    changed: list[tuple[Any, timedelta]] = []
    if seconds > 0 and torch.distributed.is_initialized():
        timeout = timedelta(seconds=seconds)
        for group in _process_groups():
            previous = _timeout_of(group)
            if previous is None or not hasattr(group, "set_timeout"):
                logger.warning("a timeout of %g s cannot be applied to process group %r", seconds, group)
                continue
            group.set_timeout(timeout)
            changed.append((group, previous))
    return changed


@contextmanager
def comm_timeout(seconds: float) -> Iterator[None]:
    """Inside the block every process group's collectives fail after `seconds` (0: unchanged);
    on exit each group gets its previous timeout back."""
    changed = bound_process_groups(seconds)
    try:
        yield
    finally:
        for group, previous in changed:
            try:
                group.set_timeout(previous)
            except RuntimeError:  # a group broken by a lost rank: nothing will use it again
                pass


@contextmanager
def collective_phase(phase: str, timeout_s: float, setting: str = "eval_timeout_s") -> Iterator[None]:
    """A block all ranks run together outside training (`phase`, e.g. "scoring the base model":
    each rank scores its slice, rank 0 writes the files): every process group's timeout is
    `timeout_s` inside, and a collective that fails raises ``WaitTimeoutError`` naming the
    ranks that did not report the failure (the one that hung or died) and the phase.

    The phase may legitimately keep a rank busy longer between collectives than training does
    (generating answers with a large model, writing its shards), hence a bound of its own
    (`setting`), generous but never unbounded.
    """
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    try:
        with comm_timeout(timeout_s):
            yield
    except RuntimeError as error:
        if not is_communication_failure(error):
            raise
        world = torch.distributed.get_world_size()
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        try:
            silent = silent_ranks(rank, world)
        except (RuntimeError, ValueError):  # the store is gone with rank 0, which hosts it
            silent = [0]
        if not silent:
            who = "the other ranks (every rank reported the failure: suspect the network)"
        else:
            who = f"rank {silent[0]}" if len(silent) == 1 else f"ranks {', '.join(map(str, silent))}"
        if "timed out" in str(error).lower():
            what = (
                f"gave up after {timeout_s:g} s ({setting}) waiting for {who} to finish {phase}: it is "
                f"still at it or hung (see its log); if {phase} legitimately takes longer, raise --{setting}"
            )
        else:
            what = f"lost {who} while {phase}: it died (see its log)"
        message = f"rank {rank}: {what} ({first_line})"
        logger.error(message)
        raise WaitTimeoutError(message) from error


def is_communication_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because of another rank or the network."""
    if isinstance(error, LostRankError | NonFiniteGradientError | WaitTimeoutError):
        return False
    if isinstance(error, torch.distributed.DistError):
        return True
    return isinstance(error, RuntimeError) and any(mark in str(error) for mark in _COMM_FAILURE_MARKS)


def silent_ranks(rank: int, world: int, wait_s: float = REPORT_WAIT_S) -> list[int]:
    """Ranks that did not report a failure through the rendezvous store within `wait_s`.

    Every surviving rank calls this after its collective failed. Raises when the store itself
    cannot be reached (where rank 0 hosts it: deepspeed launcher, srun, mpirun).
    """
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()  # no public accessor in torch 2.13
    # A torchrun agent's store outlives restarts: keep each attempt's reports apart.
    prefix = f"dsforget/failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store.set(f"{prefix}{rank}", "1")
    deadline = time.monotonic() + wait_s
    while True:
        silent = [other for other in range(world) if not store.check([f"{prefix}{other}"])]
        if not silent or time.monotonic() >= deadline:
            return silent
        time.sleep(0.1)


def lost_rank_message(rank: int, world: int, step: int, error: BaseException, timeout_s: float) -> str:
    """The error a surviving rank raises: which rank went silent, and what to do."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    try:
        silent = silent_ranks(rank, world)
        if silent:
            who = (
                f"rank(s) {silent} did not report within {REPORT_WAIT_S:g} s: dead, hung, or "
                "blocked on one that is (see their logs)"
            )
        else:
            who = "every rank reported the failure: suspect the network between them"
    except (RuntimeError, ValueError) as store_error:  # DistNetworkError is a RuntimeError
        who = (
            f"the rendezvous store cannot be reached either ({str(store_error).strip()[:80]}): rank 0, "
            "which hosts it under the deepspeed launcher, srun and mpirun, has probably died"
        )
    limit = f"{timeout_s:g} s (comm_timeout_s)" if timeout_s > 0 else "the process group default"
    return (
        f"rank {rank}: a collective failed after {step} optimizer steps ({first_line}); {who}. "
        f"A hung rank stalls the others for at most {limit}. Rerun the same command to resume "
        "from the newest complete checkpoint."
    )


# --- non-finite gradients --------------------------------------------------------------------


class NonFiniteGuard:
    """Skips steps with inf/NaN gradients where DeepSpeed does not (no ZeRO, fp32).

    A step pre-hook on the optimizer (torch's public hook API, so ForgetAdamW is unchanged):
    the ranks sum a non-finite flag over their gradients, and when any is set every gradient is
    dropped, so the step changes neither parameters nor optimizer state. The hook also sets the
    optimizer's ``overflow`` attribute, the flag DeepSpeed's engine reads after every step from
    its own ZeRO/bf16 wrappers: on a skipped step the engine then leaves the lr schedule where it
    is, counts the step in ``skipped_steps`` and reports ``was_step_applied() == False``, exactly
    as under ZeRO. Without it the engine would advance the schedule over a step not taken.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device | str, world: int) -> None:
        self.device, self.world = device, world
        self.skipped = False
        self._optimizer = optimizer
        self._handle = optimizer.register_step_pre_hook(self._check)

    def _check(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        local = any(not bool(torch.isfinite(grad).all()) for grad in grads)
        skip = any_rank(local, self.device, self.world)
        if skip:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None
            self.skipped = True
        optimizer.overflow = skip  # read by DeepSpeed's engine right after this step

    def take_skipped(self) -> bool:
        """Whether the last step was skipped; resets the flag."""
        skipped, self.skipped = self.skipped, False
        return skipped

    def remove(self) -> None:
        self._handle.remove()
        self._optimizer.__dict__.pop("overflow", None)
