"""Faults on 2 CPU ranks: preemption signals, a killed rank, saves cut short, non-finite gradients.

The end-to-end tests run the main job on the tiny lab and compare against one uninterrupted run
(losses step by step, and the final fp32 weights bit for bit). The non-finite test runs the
Trainer on a tiny model that returns a NaN loss on chosen micro-batches (this file is also the
worker script: ``python tests/train/test_faults.py SPEC.json``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from launcher import free_port, run_ranks

from dsforget.train import checkpoint
from dsforget.train.faults import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
FINETUNE = str(REPO / "launch" / "finetune.py")
STEPS = 30
RUN = [
    *("--lab_preset", "tiny", "--micro_batch_size", "8", "--eval_max_examples", "10"),
    *("--log_every", "1", "--lr_schedule", "constant", "--warmup_steps", "0", "--no-export"),
    *("--max_steps", str(STEPS)),
]


# --- helpers ----------------------------------------------------------------------------------


def rank_env(lab_cache: Path, rank: int | None = None, port: int | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "DSFORGET_CACHE": str(lab_cache),
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    if rank is not None:
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
        )
    return env


class Ranks:
    """Two ranks started directly (as srun or a batch system would), each logging to a file."""

    def __init__(self, argv: list[str], lab_cache: Path) -> None:
        port = free_port()
        self.logs = [tempfile.TemporaryFile(mode="w+") for _ in range(2)]
        self.procs = [
            subprocess.Popen(
                [sys.executable, *argv],
                env=rank_env(lab_cache, rank, port),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            for rank, log in enumerate(self.logs)
        ]

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [proc.wait(timeout=max(1.0, deadline - time.monotonic())) for proc in self.procs]
        finally:
            self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def output(self, rank: int) -> str:
        self.logs[rank].seek(0)
        return self.logs[rank].read()


def wait_for_step(output: Path, step: int, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    """Block until metrics.jsonl has a loss line for `step` (the ranks are training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(record.get("step", 0) >= step and "loss" in record for record in metrics(output)):
            return
        if any(proc.poll() is not None for proc in procs):
            raise AssertionError(f"the job ended before step {step}")
        time.sleep(0.05)
    raise TimeoutError(f"no step {step} within {timeout} s")


def metrics(output: Path) -> list[dict]:
    path = output / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def losses(output: Path) -> dict[int, float]:
    """Loss by step; a step logged twice (trained again after a resume) keeps its last value."""
    return {record["step"]: record["loss"] for record in metrics(output) if "loss" in record}


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(output / "checkpoints"), tag=f"step{STEPS}")


def assert_same_run(output: Path, reference: Path) -> None:
    assert losses(output) == losses(reference)
    got, want = final_weights(output), final_weights(reference)
    assert got.keys() == want.keys()
    differing = [name for name in want if not torch.equal(got[name], want[name])]
    assert not differing, f"{len(differing)} tensors differ from the uninterrupted run, e.g. {differing[:3]}"


def start_deepspeed(
    output: Path, lab_cache: Path, log: Path, *args: str, port: int | None = None
) -> subprocess.Popen:
    """The job under `deepspeed --num_gpus 2`, in its own session (so a failed test can end it all)."""
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2"]
    command += ["--master_port", str(port or free_port()), FINETUNE, *RUN, "--output_dir", str(output), *args]
    with open(log, "w") as file:
        return subprocess.Popen(
            command, env=rank_env(lab_cache), stdout=file, stderr=subprocess.STDOUT, start_new_session=True
        )


def launched_ranks(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The launcher's rank processes by local rank (from the --local_rank=R it passes them)."""
    ranks = {}
    for process in psutil.Process(launcher.pid).children(recursive=True):
        flags = [arg for arg in process.cmdline() if arg.startswith("--local_rank=")]
        if flags:
            ranks[int(flags[0].split("=")[1])] = process
    return ranks


def assert_shared_memory_unlinked(ranks: dict[int, psutil.Process], port: int) -> None:
    """Each rank maps both ranks' DeepSpeed CPU all-reduce buffers, and their /dev/shm names are
    already gone (dsforget.optim.comm.release_shared_memory_names), so not even kill -9 can
    leave them behind."""
    for rank, process in ranks.items():
        maps = Path(f"/proc/{process.pid}/maps").read_text().splitlines()
        buffers = {
            line.split()[-2] if line.endswith("(deleted)") else line.split()[-1]: line for line in maps
        }
        mapped = {name: line for name, line in buffers.items() if f"_{port}_" in name and "allreduce" in name}
        assert len(mapped) == 2, f"rank {rank} maps {sorted(mapped)}"
        assert all(line.endswith("(deleted)") for line in mapped.values()), mapped


def end_session(launcher: subprocess.Popen) -> None:
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def finetune(output: Path, lab_cache: Path, *args: str) -> None:
    run_ranks(
        [FINETUNE, *RUN, "--output_dir", str(output), *args],
        world_size=2,
        timeout=600,
        env={"DSFORGET_CACHE": str(lab_cache)},
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory, lab_cache: Path) -> Path:
    """One uninterrupted run: the reference every interrupted and resumed run must equal."""
    output = tmp_path_factory.mktemp("straight")
    finetune(output, lab_cache)
    return output


# --- preemption -------------------------------------------------------------------------------


def test_sigterm_to_one_rank_saves_on_both_and_resume_is_exact(
    tmp_path: Path, lab_cache: Path, straight: Path
) -> None:
    """Only rank 1 gets SIGTERM. Catches ranks that do not agree on the step to stop at (rank 0
    would train on and hang in its next collective), a stop that skips the checkpoint or exits
    with another status than PREEMPTED_EXIT_CODE, and a checkpoint that does not resume exactly:
    the resumed run's losses and final weights must equal the uninterrupted run's."""
    output = tmp_path / "run"
    ranks = Ranks([FINETUNE, *RUN, "--output_dir", str(output)], lab_cache)
    try:
        wait_for_step(output, 3, ranks.procs)
        ranks.procs[1].send_signal(signal.SIGTERM)
        codes = ranks.wait(timeout=300)
    finally:
        ranks.kill()
    assert codes == [PREEMPTED_EXIT_CODE] * 2, ranks.output(0)[-3000:] + ranks.output(1)[-3000:]
    saved = checkpoint.latest_checkpoint(output / "checkpoints")
    stopped_at = int(saved.name.removeprefix("step"))
    assert 3 <= stopped_at < STEPS
    assert {"step": stopped_at, "preempted": "a stop signal on another rank"} in metrics(output)
    assert f"stopping after step {stopped_at} (SIGTERM)" in ranks.output(1)
    finetune(output, lab_cache)
    assert_same_run(output, straight)


def test_sigusr1_under_the_deepspeed_launcher_exits_with_the_preemption_status(
    tmp_path: Path, lab_cache: Path
) -> None:
    """SLURM's warning (--signal=USR1@120) reaches every task. Catches SIGUSR1 left to its default
    action (the rank dies without a checkpoint) and a status the deepspeed launcher does not pass
    on: it must exit with the ranks' 75, so that a batch script can requeue."""
    output, log = tmp_path / "run", tmp_path / "launcher.log"
    launcher = start_deepspeed(output, lab_cache, log)
    try:
        wait_for_step(output, 3, [launcher])
        ranks = launched_ranks(launcher)
        assert sorted(ranks) == [0, 1]
        for process in ranks.values():
            process.send_signal(signal.SIGUSR1)
        code = launcher.wait(timeout=300)
    finally:
        end_session(launcher)
    assert code == PREEMPTED_EXIT_CODE, log.read_text()[-3000:]
    saved = checkpoint.latest_checkpoint(output / "checkpoints")
    assert saved is not None and int(saved.name.removeprefix("step")) < STEPS
    assert any(record.get("preempted") == "SIGUSR1" for record in metrics(output))


# --- a lost rank and a save cut short ---------------------------------------------------------


def test_killed_rank_fails_the_job_fast_names_it_and_resume_is_exact(
    tmp_path: Path, lab_cache: Path, straight: Path
) -> None:
    """kill -9 of rank 1 mid-run under the deepspeed launcher. Catches a survivor that hangs (a
    process group without comm_timeout_s) or ends with gloo's anonymous "Connection reset by
    peer" instead of naming rank 1, and a launcher that does not end the job. Then a save cut
    short is simulated on top (the newest checkpoint loses its COMPLETE marker and half of a
    file): resume must pick the checkpoint before it and still reproduce the uninterrupted run."""
    output, log, port = tmp_path / "run", tmp_path / "launcher.log", free_port()
    launcher = start_deepspeed(
        output, lab_cache, log, "--save_every", "4", "--comm_timeout_s", "60", port=port
    )
    try:
        wait_for_step(output, 9, [launcher])
        ranks = launched_ranks(launcher)
        assert_shared_memory_unlinked(ranks, port)
        victim = ranks[1]
        killed = time.monotonic()
        victim.kill()
        code = launcher.wait(timeout=120)
        seconds_to_fail = time.monotonic() - killed
    finally:
        end_session(launcher)
    text = log.read_text()
    assert code != 0, text[-3000:]
    assert seconds_to_fail < 60, seconds_to_fail  # well within comm_timeout_s: a dead peer fails at once
    assert "LostRankError: rank 0: a collective failed" in text and "rank(s) [1] did not report" in text
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    print(f"job ended {seconds_to_fail:.1f} s after kill -9 of rank 1")

    root = output / "checkpoints"
    *_, previous, newest = checkpoint.complete_checkpoints(root)
    (newest / checkpoint.COMPLETE).unlink()
    partition = newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    partition.write_bytes(partition.read_bytes()[: partition.stat().st_size // 2])
    assert checkpoint.latest_checkpoint(root) == previous
    finetune(output, lab_cache, "--save_every", "4")
    assert_same_run(output, straight)


def test_hung_rank_fails_the_other_within_comm_timeout_under_zero2(tmp_path: Path, lab_cache: Path) -> None:
    """SIGSTOP of rank 1 under ZeRO-2 with comm_timeout_s 10. Catches the timeout reaching only
    the world group: DeepSpeed runs ZeRO-1/2 collectives on a group of its own, created with
    torch's 30-minute gloo default, so rank 0 would wait half an hour. Rank 0 must fail within
    the timeout plus the report wait and name rank 1."""
    output = tmp_path / "run"
    zero2 = str(REPO / "configs" / "zero2.json")
    argv = [FINETUNE, *RUN, "--output_dir", str(output), "--deepspeed", zero2, "--comm_timeout_s", "10"]
    ranks = Ranks(argv, lab_cache)
    try:
        wait_for_step(output, 3, ranks.procs)
        ranks.procs[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        code = ranks.procs[0].wait(timeout=120)
        seconds_to_fail = time.monotonic() - stopped
    finally:
        ranks.kill()
    text = ranks.output(0)
    assert code != 0, text[-3000:]
    assert seconds_to_fail < 10 + 5 + 20, seconds_to_fail  # timeout, report wait, teardown on 2 busy cores
    assert "Timed out" in text and "rank(s) [1] did not report" in text and "10 s (comm_timeout_s)" in text
    print(f"rank 0 ended {seconds_to_fail:.1f} s after rank 1 hung")


def test_save_cut_short_leaves_the_previous_checkpoint_the_newest(tmp_path: Path, monkeypatch) -> None:
    """checkpoint.save crashing at any point (inside DeepSpeed's writes, before the marker, while
    deleting old checkpoints, or while saving again over a complete tag) must leave a directory
    that does not count as complete. Catches a marker written early, kept while a tag is
    overwritten, or left behind by a half-finished deletion."""
    from deepspeed import comm

    from dsforget.optim.plan import DENSE, MaskPlan

    monkeypatch.setattr(comm, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(comm, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(comm, "barrier", lambda group=None: None)
    plan = MaskPlan({"w": DENSE}, method="full")

    class Engine:
        crash = False

        def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
            directory = Path(root) / tag
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "model_states.pt").write_bytes(b"x" * 100)
            if self.crash:
                raise KeyboardInterrupt("killed while DeepSpeed writes")
            (directory / "optim_states.pt").write_bytes(b"y" * 100)

    engine, root = Engine(), tmp_path / "checkpoints"

    def save(step: int, keep: int = 5, parent: Path | None = None) -> Path:
        parent = parent or checkpoint.latest_checkpoint(root)
        state = checkpoint.TrainerState(step, 0, 0)
        return checkpoint.save(engine, root, state, plan, keep=keep, parent=parent)

    save(2)
    engine.crash = True
    with pytest.raises(KeyboardInterrupt):
        save(4)
    assert checkpoint.latest_checkpoint(root) == root / "step2"

    engine.crash = False
    original = checkpoint.write_atomic

    def crash_at_marker(path: Path, text: str) -> None:
        if path.name == checkpoint.COMPLETE:
            raise KeyboardInterrupt("killed before the marker")
        original(path, text)

    monkeypatch.setattr(checkpoint, "write_atomic", crash_at_marker)
    with pytest.raises(KeyboardInterrupt):
        save(4)
    assert checkpoint.latest_checkpoint(root) == root / "step2"
    monkeypatch.setattr(checkpoint, "write_atomic", original)

    save(4)
    engine.crash = True  # a run resumed from step 2 saves step 4 again and is killed doing it
    with pytest.raises(KeyboardInterrupt):
        save(4, parent=root / "step2")
    assert checkpoint.latest_checkpoint(root) == root / "step4"  # the old step 4, untouched

    engine.crash = False
    rewound = save(4, parent=root / "step2")
    assert checkpoint.complete_checkpoints(root) == [root / "step2", rewound]
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *args, **kwargs: None)  # killed mid-delete
    save(6, keep=1)
    assert checkpoint.complete_checkpoints(root) == [root / "step6"]
    with pytest.raises(FileNotFoundError, match="incomplete"):
        checkpoint.check_resume(rewound, {}, world_size=1)


# --- non-finite gradients ---------------------------------------------------------------------

NONFINITE_STEPS = 10
POISON = {"1": [3], "0": [6, 7, 8]}  # rank: 1-based optimizer steps whose loss is NaN on that rank
MAX_NONFINITE = 3


@pytest.mark.parametrize("stage", [0, 2], ids=["no-zero-own-guard", "zero2-deepspeed-skip"])
def test_nonfinite_steps_are_skipped_counted_and_too_many_abort(tmp_path: Path, stage: int) -> None:
    """A NaN loss on one rank only (step 3), then on the other for three steps in a row (6-8) with
    max_nonfinite_steps 3. Catches a skipped step that still changes parameters or optimizer
    state, ranks that disagree on skipping (their parameters would diverge), skips that are not
    counted in metrics.jsonl, and a run that trains on (or hangs) instead of stopping with a
    clear error on every rank, and an lr schedule that advances over a skipped step (it did on
    stage 0, where the engine stepped the scheduler after the guard's skip). Stage 0 exercises
    the trainer's own guard; ZeRO-2 DeepSpeed's skip."""
    spec = {"stage": stage, "output": str(tmp_path)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    run_ranks([__file__, str(tmp_path / "spec.json")], world_size=2, timeout=300)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for rank, result in enumerate(results):
        assert "3 optimizer steps in a row (steps 6-8)" in result["error"], (rank, result)
        assert "max_nonfinite_steps=3" in result["error"]
        params = {position["step"]: p for position, p, _ in result["snapshots"]}
        state = {position["step"]: s for position, _, s in result["snapshots"]}
        assert sorted(params) == list(range(1, 8))  # step 8 aborts before its save
        for skipped, before in ((3, 2), (6, 5), (7, 5)):
            assert torch.equal(params[skipped], params[before]), (rank, skipped)
            assert torch.equal(state[skipped], state[before]), (rank, skipped)
        for applied in (2, 4, 5):
            assert not torch.equal(params[applied], params[applied - 1]), (rank, applied)
        assert all(torch.isfinite(p).all() for p in params.values())
        counts = {position["step"]: position["nonfinite_steps"] for position, _, _ in result["snapshots"]}
        assert counts == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 2, 7: 3}
        for position, _, _ in result["snapshots"]:  # the lr schedule advances on applied steps only
            applied = position["step"] - position["nonfinite_steps"]
            assert position["schedule_steps"] == applied, (rank, position)
            assert position["lr"] == pytest.approx(1e-2 / (1 + applied)), (rank, position)
    assert torch.equal(results[0]["snapshots"][-1][1], results[1]["snapshots"][-1][1])  # ranks agree
    records = metrics(tmp_path)
    skipped = [(r["step"], r["nonfinite_steps"]) for r in records if r.get("nonfinite_gradient")]
    assert skipped == [(3, 1), (6, 2), (7, 3), (8, 4)]
    assert [r["nonfinite_steps"] for r in records if "loss" in r or "lr" in r][-1] == 3


def _nonfinite_worker(spec_path: str) -> None:
    """One rank: the Trainer on a tiny Llama whose loss is NaN at POISON's steps on this rank."""
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    import dsforget
    from dsforget.data import PaddingCollator
    from dsforget.train.faults import NonFiniteGradientError
    from dsforget.train.trainer import LoopConfig, Trainer

    spec = json.loads(Path(spec_path).read_text())
    deepspeed.init_distributed(dist_backend="gloo")
    rank = deepspeed.comm.get_rank()
    poisoned_calls = {step - 1 for step in POISON[str(rank)]}  # one forward per step here

    class PoisonedLlama(LlamaForCausalLM):
        calls = 0

        def forward(self, **kwargs):
            out = super().forward(**kwargs)
            if PoisonedLlama.calls in poisoned_calls:
                out.loss = out.loss * float("nan")
            PoisonedLlama.calls += 1
            return out

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = PoisonedLlama(config)
    plan = dsforget.build_plan(model, "mofo", fraction=0.5)
    optimizer = dsforget.ForgetAdamW(model.named_parameters(), plan=plan, lr=1e-2)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": spec["stage"]},
        "steps_per_print": 10**9,
    }
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    engine, *_ = dsforget.initialize(
        model=model, optimizer=optimizer, config=ds_config, lr_scheduler=schedule
    )
    generator = torch.Generator().manual_seed(1)
    examples = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(1, 97, (2 * 2 * NONFINITE_STEPS, 9), generator=generator).tolist()
    ]
    snapshots = []

    def snapshot(position: checkpoint.TrainerState) -> None:
        params = torch.cat([p.detach().flatten().clone() for p in engine.module.parameters()])
        state = torch.cat(
            [
                tensor.detach().flatten().float().clone()
                for per_param in optimizer.state.values()
                for tensor in per_param.values()
                if torch.is_tensor(tensor)
            ]
        )
        scheduled = {"schedule_steps": engine.lr_scheduler.last_epoch, "lr": engine.get_lr()[0]}
        snapshots.append(({**dataclasses.asdict(position), **scheduled}, params, state))

    loop = LoopConfig(
        micro_batch=2,
        accumulation=1,
        total_steps=NONFINITE_STEPS,
        seed=0,
        output_dir=Path(spec["output"]),
        log_every=1,
        eval_every=0,
        save_every=1,
        max_nonfinite_steps=MAX_NONFINITE,
    )
    trainer = Trainer(engine, examples, [], PaddingCollator(pad_token_id=0), loop, save=snapshot)
    error = None
    try:
        trainer.fit(checkpoint.TrainerState(0, 0, 0))
    except NonFiniteGradientError as raised:
        error = str(raised)
    torch.save({"error": error, "snapshots": snapshots}, Path(spec["output"]) / f"rank{rank}.pt")
    deepspeed.comm.barrier()
    deepspeed.comm.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/workers/train_tiny.py: teardown after DeepSpeed on CPU may abort


if __name__ == "__main__":
    _nonfinite_worker(sys.argv[1])


# --- waits for rank 0 ---------------------------------------------------------------------------

STALL_RANK0 = """
import os, runpy, sys, time
from pathlib import Path
import dsforget.train.finetune as finetune

def stalled_evaluate(*args, **kwargs):
    Path(os.environ["STALL_MARKER"]).write_text("stalling")
    time.sleep(600)

if os.environ["RANK"] == "0":
    finetune.evaluate = stalled_evaluate
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_rank0_stalled_in_evaluation_fails_the_others_naming_it(tmp_path: Path, tiny_model: Path) -> None:
    """Rank 0 hangs while scoring the base model; with --eval_timeout_s 5 rank 1 must fail within
    seconds, naming rank 0 and the phase. Catches the barrier after rank 0's evaluation waiting
    unbounded (DeepSpeed's 30 minutes on gloo) or ending with gloo's anonymous "Timed out"."""
    script = tmp_path / "stall.py"
    script.write_text(STALL_RANK0)
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n' * 40)
    marker = tmp_path / "stalling"
    argv = [str(script), FINETUNE, "--model", str(tiny_model), "--data", str(data), "--max_steps", "1"]
    argv += ["--output_dir", str(tmp_path / "run"), "--eval_timeout_s", "5"]
    os.environ["STALL_MARKER"] = str(marker)
    try:
        ranks = Ranks(argv, tmp_path)
    finally:
        del os.environ["STALL_MARKER"]
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and time.monotonic() < deadline and ranks.procs[0].poll() is None:
            time.sleep(0.1)
        assert marker.exists(), ranks.output(0)[-3000:]
        stalled = time.monotonic()
        code = ranks.procs[1].wait(timeout=120)
        seconds_to_fail = time.monotonic() - stalled
        assert ranks.procs[0].poll() is None  # rank 0 is still "evaluating": rank 1 did not wait for it
    finally:
        ranks.kill()
    text = ranks.output(1)
    assert code != 0, text[-3000:]
    assert seconds_to_fail < 5 + 30, seconds_to_fail  # the bound, plus teardown on 2 busy cores
    assert (
        "rank 1: gave up after 5 s (eval_timeout_s) waiting for rank 0 to finish scoring the base model"
        in text
    ), text[-3000:]
    print(f"rank 1 ended {seconds_to_fail:.1f} s after rank 0 stalled")
