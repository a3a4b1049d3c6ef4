"""The one-GPU check (tests/gpu, run by hand on a GPU machine) kept in step with the code.

Without a GPU: gpu_scale.py's dry run on the CPU under the Triton interpreter; gpu_check.sh's
syntax and flow with a stub interpreter (tests/gpu/stub_python) in a copy of the tree, every part
passing and every FAIL path; and the commands the check runs, as the stub logged them, against
today's code (kernel test ids and their count, finetune flags, configs, the bench's flags and row
names, the backend log line). See tests/gpu/README.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "tests" / "gpu"
CHECK = (GPU / "gpu_check.sh").read_text()
# makes tests/kernels/helpers.py's fused_backends() add the triton-cuda cases (collection only)
FAKE_CUDA = """
import torch
import dsforget.kernels._triton as triton_module
_usable = triton_module.triton_usable
triton_module.triton_usable = lambda device: torch.device(device).type == "cuda" or _usable(device)
"""


def test_gpu_check_scripts_parse() -> None:
    for script in ("gpu_check.sh", "build_wheels.sh", "stub_python"):
        done = subprocess.run(["bash", "-n", str(GPU / script)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script}: {done.stderr}"


def test_gpu_scale_dry_run_on_cpu() -> None:
    """Catches gpu_scale.py calling what no longer exists (a renamed module, function or flag)
    or a check of its own that fails on the tiny CPU layouts."""
    pytest.importorskip("triton")
    env = {**os.environ, "GPUCHECK_DEVICE": "cpu", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(GPU / "gpu_scale.py"), "--world", "65536", "--layers", "1", "--quick"]
    done = subprocess.run(
        [*command, "--skip-ds"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            results[result["check"]] = result
    tail = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == 0, tail
    expected = {"device", "optimizer", "multi_tensor", "int64", "llama8b_step", "llama8b_exact"}
    expected |= {"llama8b_vs_adam", "ties_embedding", "summary"}
    assert expected <= set(results), tail
    assert results["summary"] == {"check": "summary", "ok": True, "failures": []}, tail
    assert results["multi_tensor"]["batched"] and results["multi_tensor"]["bit_mismatches"] == 0
    assert results["llama8b_step"]["syncs_per_step"] == -1  # not counted on the CPU
    assert isinstance(results["llama8b_vs_adam"]["ms"]["torch-adamw-fused"], float), results[
        "llama8b_vs_adam"
    ]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of the source tree (the check links dsforget/kernels in the tree it runs in)."""
    target = tmp_path_factory.mktemp("tree") / "repo"
    skip = shutil.ignore_patterns(
        ".git",
        ".venv",
        "__pycache__",
        ".pytest_cache",
        ".ruff_cache",
        "*.egg-info",
        "runs",
        ".cache",
        ".gpucheck",
    )
    shutil.copytree(REPO, target, ignore=skip, symlinks=True)
    kernels_link = target / "dsforget" / "kernels"
    if kernels_link.is_symlink():
        kernels_link.unlink()
    return target


def run_check(tree: Path, work: Path, mode: str, cwd: Path | None = None, **env: str):
    """gpu_check.sh with the stub interpreter: (exit status, summary lines, logged calls)."""
    carry = work / "carry"
    (carry / "whl").mkdir(parents=True, exist_ok=True)
    (carry / "whl" / "stub-0-py3-none-any.whl").touch()
    environment = {
        **os.environ,
        "PYTHON": str(tree / "tests" / "gpu" / "stub_python"),
        "STUB_MODE": mode,
        "STUB_REAL_PYTHON": sys.executable,
        "STUB_LOG": str(work / "calls.log"),
        "OUT": str(work / "out"),
        "GPUCHECK_WORK": str(work / "work"),
        "GPUCHECK_SITE": str(work / "site"),
        "GPUCHECK_CARRY": str(carry),
        **env,
    }
    script = str(tree / "tests" / "gpu" / "gpu_check.sh")
    done = subprocess.run(
        ["bash", script], cwd=cwd or tree, env=environment, capture_output=True, text=True, timeout=120
    )
    summary = (work / "out" / "summary.txt").read_text().splitlines()
    calls = []
    if (work / "calls.log").exists():
        calls = [line.split("\t") for line in (work / "calls.log").read_text().splitlines()]
    return done.returncode, [line.split("] ", 1)[1] for line in summary], calls


@pytest.fixture(scope="module")
def passing_run(tree, tmp_path_factory):
    return run_check(tree, tmp_path_factory.mktemp("ok"), "ok")


def test_gpu_check_flow_every_part_passing(passing_run) -> None:
    status, summary, _ = passing_run
    text = "\n".join(summary)
    assert status == 0, text
    wanted = [
        "ok   carried wheels installed",
        "ok   dsforget imports; default backend for cuda tensors: triton",
        "ok   kernel tests on CUDA: 58 triton-cuda cases passed",
        *(f"ok   smoke {name}: " for name in ("zero2", "zero3", "zero3_cofitune", "zero3_offload")),
        "ok   DeepSpeed FusedAdam JIT build",
        "ok   gpu_scale.py",
        *(f"     | {row} |" for row in ("dsforget-triton", "torch-adamw-fused", "deepspeed-fused-adam")),
        "ok   bench (16M,256M)",
        "DONE in ",
    ]
    for start in wanted:
        assert any(line.startswith(start) for line in summary), f"no line {start!r} in\n{text}"
    assert not any(line.startswith("FAIL") for line in summary), text


def test_gpu_check_flow_every_fail_path(tree, tmp_path) -> None:
    status, summary, _ = run_check(tree, tmp_path / "fail", "fail")
    text = "\n".join(summary)
    assert status == 1, text
    for start in [
        "FAIL installing the carried wheels",
        "FAIL default backend for cuda tensors is 'torch'",
        "FAIL kernel tests on CUDA (exit 1, 3 triton-cuda cases passed, 58 expected)",
        *(f"FAIL smoke {name}: exit_0=N" for name in ("zero2", "zero3", "zero3_cofitune", "zero3_offload")),
        "warn DeepSpeed FusedAdam did not build",
        "FAIL gpu_scale.py (exit 1",
        "FAIL bench (exit 1",
        "DONE in ",
    ]:
        assert any(line.startswith(start) for line in summary), f"no line {start!r} in\n{text}"

    status, summary, _ = run_check(tree, tmp_path / "nods", "nods", GPUCHECK_BUDGET_S="0")
    text = "\n".join(summary)
    assert status == 1, text
    for start in ["FAIL import deepspeed", "skip gpu_scale.py", "skip bench"]:
        assert any(line.startswith(start) for line in summary), f"no line {start!r} in\n{text}"
    assert not any(re.match(r"(ok  |FAIL|\.\.\. ).* smoke", line) for line in summary), text

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    status, summary, _ = run_check(tree, tmp_path / "root", "ok", cwd=elsewhere)
    assert status == 2 and summary[0].startswith("FAIL run this from the dsforget repository root"), summary


def calls_of(calls: list[list[str]], marker: str) -> list[list[str]]:
    return [call for call in calls if marker in call]


def test_gpu_check_kernel_tests_select_todays_cuda_cases(passing_run, tmp_path) -> None:
    """Catches A1 naming a test path or -k selection that no longer collects the triton-cuda cases,
    and a KERNEL_CASES threshold out of step with their number (a new CUDA case raises it)."""
    (call,) = calls_of(passing_run[2], "pytest")
    arguments = [token for token in call[call.index("pytest") + 1 :] if token != "-q"]  # ids listed: one -q
    plugin = tmp_path / "fake_cuda_for_collection.py"
    plugin.write_text(FAKE_CUDA)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "fake_cuda_for_collection",
            "--collect-only",
            "-q",
            *arguments,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    cuda = [test_id for test_id in ids if "triton-cuda" in test_id]
    required = int(re.search(r"GPUCHECK_KERNEL_CASES:-(\d+)", CHECK).group(1))
    assert any("test_backend_choice_per_device" in test_id for test_id in ids)
    assert len(cuda) == required, (
        f"{len(cuda)} triton-cuda cases collected: set KERNEL_CASES in tests/gpu/gpu_check.sh (and its "
        f"header, README) to {len(cuda)}"
    )


def test_gpu_check_commands_refer_to_what_exists(passing_run) -> None:
    """Catches a finetune flag, config file, bench flag or module the check names that is gone."""
    from dsforget.train.run_config import RunConfig

    calls = passing_run[2]
    finetune_flags = {"--config"}
    for field in dataclasses.fields(RunConfig):
        finetune_flags |= {f"--{field.name}", f"--no-{field.name}"}
    smokes = calls_of(calls, "deepspeed.launcher.runner")
    assert len(smokes) == 4
    for call in smokes:
        script = call.index("launch/finetune.py")
        flags = {token for token in call[script + 1 :] if token.startswith("--")}
        assert flags <= finetune_flags, flags - finetune_flags
        config = call[call.index("--deepspeed") + 1]
        assert (REPO / config).exists(), config

    (bench,) = calls_of(calls, "dsforget.kernels.bench")
    source = (REPO / "kernels" / "bench" / "flat.py").read_text()
    defined = set(re.findall(r"""["'](--[a-z][a-z0-9_-]*)["']""", source))
    assert {token for token in bench if token.startswith("--")} <= defined
    assert (REPO / "kernels" / "bench" / "__main__.py").exists()

    (scale,) = [call for call in calls if call[0].endswith("gpu_scale.py")]
    assert Path(scale[0]).name == "gpu_scale.py" and (GPU / "gpu_scale.py").exists()


def test_gpu_check_greps_todays_bench_rows_and_backend_line(caplog) -> None:
    """Catches a renamed benchmark row or table layout, or a reworded backend log line, that the
    check's greps would silently stop finding."""
    import torch
    from dsforget.kernels.bench import flat

    pattern = re.search(r'grep -E "([^"]*)" "\$OUT/bench.log"', CHECK).group(1)  # as bash hands it over
    names = ["dsforget-triton", "torch-adamw-fused", "deepspeed-fused-adam"]
    results = [flat.Result(name, median_ms=1.0, p20_ms=1.0, p80_ms=1.0) for name in [*names, "other"]]
    table = flat.format_table(1 << 20, results, 100.0, "stub").splitlines()
    found = [line for line in table if re.search(pattern, line)]
    assert len(found) == 4 and found[0].startswith("### "), (pattern, table)  # the title and 3 rows
    assert 'f"dsforget-{fused}"' in (REPO / "kernels" / "bench" / "flat.py").read_text()

    import dsforget

    log_pattern = re.search(r'r"(optimizer step uses[^"]+)"', CHECK).group(1)
    with caplog.at_level(logging.INFO, logger="dsforget"):
        optimizer = dsforget.MoFOAdamW(
            torch.nn.Linear(4, 4).named_parameters(), fraction=0.5, backend="torch"
        )
        optimizer.prepare_kernels()
    assert any(re.search(log_pattern, record.getMessage()) for record in caplog.records), caplog.text
