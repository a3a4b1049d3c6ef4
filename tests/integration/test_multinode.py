"""Two nodes simulated on this machine: `torchrun --nnodes 2 --node_rank 0|1`, one rank each,
one shared output_dir, against the one-node run of the same world size (`torchrun
--nproc_per_node 2`).

What is shared and what is node-local here, as on a cluster with a shared filesystem:
- shared: output_dir, and TORCH_EXTENSIONS_DIR (its default, ~/.cache/torch_extensions, is
  usually on the shared home; a node-local one would cost a ~60 s C++ build per node here).
- node-local: DSFORGET_CACHE (the lab) and TMPDIR, one directory per node. Node 0's cache holds
  a copy of the session's lab, node 1's starts empty: global rank 1 must build its node's lab
  itself, and build the same one. There is no tokenisation cache (every rank tokenises its data
  in memory); DeepSpeed's /dev/shm all-reduce engages only when LOCAL_SIZE equals the world size
  (shm_interface.cpp), which torchrun never sets, so neither run may leave a buffer there.

Every rank runs under tests/workers/trace_writes.py, which records each path it opens for
writing or renames: each file in output_dir must have exactly one writer, rank 0 for shared
files and rank r for the per-rank ones (rng_rank<r>, zero_pp_rank_<r>_...). About 2.5 min on
2 idle cores once the session's lab is built.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from launcher import REPO, free_port

pytestmark = pytest.mark.distributed

FINETUNE = str(REPO / "launch" / "finetune.py")
TRACER = str(REPO / "tests" / "workers" / "trace_writes.py")
RUN = [
    *("--lab_preset", "tiny", "--micro_batch_size", "8", "--max_steps", "4", "--save_every", "2"),
    *("--log_every", "1", "--eval_max_examples", "20"),
]
PER_RANK_FILE = re.compile(r"(?:rng_rank|zero_pp_rank_)(\d+)")
TIMEOUT_S = 600


def torchrun(port: int, nnodes: int, node_rank: int, nproc: int, log_dir: Path, output: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *("--nnodes", str(nnodes), "--node_rank", str(node_rank), "--nproc_per_node", str(nproc)),
        *("--master_addr", "127.0.0.1", "--master_port", str(port)),
        TRACER,
        str(log_dir),
        FINETUNE,
        *RUN,
        "--output_dir",
        str(output),
    ]


def node_env(cache: Path, tmp: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
        and not key.startswith("MASTER_")
    }
    tmp.mkdir(parents=True, exist_ok=True)
    # OMP_NUM_THREADS: torchrun sets 1 only for nproc_per_node > 1; the same threads on both sides
    return {
        **env,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "DSFORGET_CACHE": str(cache),
        "TMPDIR": str(tmp),
    }


def run_nodes(commands: list[tuple[list[str], dict[str, str]]], logs: Path) -> None:
    """Start every node's launcher at once; wait for all; raise with each one's output on failure."""
    procs = []
    for node, (command, env) in enumerate(commands):
        out = open(logs / f"node{node}.log", "w")  # noqa: SIM115 - closed below
        procs.append(
            (
                subprocess.Popen(
                    command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                ),
                out,
            )
        )
    failed = []
    for node, (proc, out) in enumerate(procs):
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other, _ in procs:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            proc.wait()
        out.close()
        if proc.returncode != 0:
            failed.append(node)
    if failed:
        tails = "\n".join(f"--- node {n} ---\n{(logs / f'node{n}.log').read_text()[-4000:]}" for n in failed)
        raise RuntimeError(f"node(s) {failed} failed:\n{tails}")


def writers(log_dir: Path, root: Path) -> dict[str, set[int]]:
    """For each file under `root` (relative path), the ranks that wrote it: opened it for writing,
    or renamed a file or directory onto it (the files inside a renamed directory included)."""
    written: dict[str, set[int]] = defaultdict(set)
    for log in sorted(log_dir.glob("writes-rank*.jsonl")):
        by_path: dict[str, set[int]] = defaultdict(set)  # this process's writes, by absolute path
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry["event"] == "write":
                by_path[entry["path"]].add(entry["rank"])
            else:  # rename: what was written at or under the source now lies under the target
                source, target = entry["path"], entry["to"]
                for path in [p for p in by_path if p == source or p.startswith(source + os.sep)]:
                    by_path[target + path[len(source) :]] |= by_path[path]
                by_path[target].add(entry["rank"])
        for path, ranks in by_path.items():
            if Path(path).is_relative_to(root):
                written[str(Path(path).relative_to(root))] |= ranks
    return written


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def losses(output: Path) -> list[tuple[int, float]]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["loss"]) for m in map(json.loads, lines) if "loss" in m]


def shm_buffers(port: int) -> list[str]:
    return sorted(
        str(p) for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, lab_cache: Path) -> dict[str, Path]:
    """The one-node run (2 ranks) and the two-node run (1 rank each); their directories."""
    base = tmp_path_factory.mktemp("multinode")
    one, two = base / "one_node", base / "two_nodes"
    for run in (one, two):
        (run / "trace").mkdir(parents=True)
    port = free_port()  # lab_cache holds the tiny lab already (conftest copies it in)
    command = torchrun(port, 1, 0, 2, one / "trace", one / "output")
    run_nodes([(command, node_env(lab_cache, one / "tmp"))], one)
    assert not shm_buffers(port), shm_buffers(port)

    shutil.copytree(lab_cache / "lab", two / "node0" / "cache" / "lab")
    port = free_port()
    nodes = [
        (
            torchrun(port, 2, node, 1, two / "trace", two / "output"),
            node_env(two / f"node{node}" / "cache", two / f"node{node}" / "tmp"),
        )
        for node in (0, 1)
    ]
    run_nodes(nodes, two)
    assert not shm_buffers(port), shm_buffers(port)
    return {"one": one, "two": two, "lab": lab_cache / "lab"}


def test_two_nodes_train_as_one_node_of_the_same_world_size(runs: dict[str, Path]) -> None:
    """Catches a run that depends on where its ranks live: data sharded by local rank (both nodes
    would train the same half), a node-local lab built differently on another node (another
    tokenizer or base model), or state saved or restored per node instead of per rank."""
    one, two = runs["one"] / "output", runs["two"] / "output"
    assert losses(two) == losses(one) and len(losses(one)) == 4, (losses(one), losses(two))
    for name in ("hf_model/model.safetensors", "plan.json"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    named = re.compile(r"events\.out\.tfevents\..*")  # tensorboard's names hold the time and pid
    assert [named.sub("events", f) for f in files(two)] == [named.sub("events", f) for f in files(one)]
    report_one, report_two = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert report_two["after"] == report_one["after"] and report_two["drift"] == report_one["drift"]


@pytest.mark.parametrize("run", ["one", "two"])
def test_each_output_file_has_one_writer(runs: dict[str, Path], run: str) -> None:
    """Catches a shared file (config, plan, metrics, a checkpoint's shared parts, report, export)
    written by more than one process, or by a rank other than 0 (e.g. every node's first local
    rank): on a shared filesystem two writers interleave or overwrite each other. Per-rank files
    must come from their own rank. A file no record names means a writer the tracer missed."""
    output = runs[run] / "output"
    written = writers(runs[run] / "trace", output)
    unattributed = [name for name in files(output) if name not in written]
    assert not unattributed, f"files in output_dir no traced process wrote: {unattributed}"
    wrong = {}
    for name in files(output):
        per_rank = PER_RANK_FILE.search(name)
        expected = {int(per_rank.group(1))} if per_rank else {0}
        if written[name] != expected:
            wrong[name] = (sorted(written[name]), sorted(expected))
    assert not wrong, f"file: (ranks that wrote it, expected): {wrong}"
    assert any(PER_RANK_FILE.search(name) and written[name] == {1} for name in files(output))


def test_each_node_builds_its_own_lab_once(runs: dict[str, Path]) -> None:
    """Catches node-local work left to global rank 0 (node 1 would find no lab, or wait for a build
    no one on its node does) and a lab build that differs between machines: node 1, whose only
    rank is global rank 1, builds the lab in its own cache, exactly once, identical to node 0's."""
    built = runs["two"] / "node1" / "cache" / "lab"
    labs = [p.name for p in built.iterdir() if p.is_dir()]
    assert len(labs) == 1 and not [p.name for p in built.iterdir() if ".tmp-" in p.name], list(
        built.iterdir()
    )
    reference = runs["lab"] / labs[0]
    assert files(built / labs[0]) == files(reference)
    for name in files(reference):
        if name != "build_info.json":  # holds the build's timings
            assert (built / labs[0] / name).read_bytes() == (reference / name).read_bytes(), name
    node0 = runs["two"] / "node0" / "cache" / "lab"
    assert sorted(p.name for p in node0.iterdir() if p.is_dir()) == labs
    info = "build_info.json"
    assert (node0 / labs[0] / info).read_bytes() == (reference / info).read_bytes()  # found, not rebuilt
    # the build itself runs in a child process (untraced); its lock file is opened by the rank
    assert not writers(runs["two"] / "trace", node0)
    assert set().union(*writers(runs["two"] / "trace", built).values()) == {1}
