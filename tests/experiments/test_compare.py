"""launch/compare.py on bad input: one ``error:`` line, status 2, nothing run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from launcher import REPO

from dsforget.errors import ConfigError


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--methods", "full,mofo", "--", "--lr", "0"], r"error: lr=0\.0 must be > 0"),
        (["--methods", "full,mof"], r"error: .*'mof'"),
        (["--methods", "full,mofo", "--lrs", "mofo=1e-3,x"], r"error: --lrs 'mofo=1e-3,x'"),
        (["--methods", "full,mofo", "--lrs", "hft=1e-3"], r"error: --lrs 'hft=1e-3': expected METHOD=LR"),
        (["--methods", "full,mofo", "--plan_seeds", "mofo=1,2"], r"'mofo' draws no plan at random"),
        (["--methods", "full,hft", "--plan_seeds", "hft=0,a"], r"'0,a' is not a list of integers"),
        (
            ["--methods", "full,l2", "--method_options", "l2={strength: 3}"],
            r"error: --method_options 'l2=\{strength: 3\}': '\{strength: 3\}' is not a JSON object",
        ),
        (
            ["--methods", "full,freeze", "--method_options", 'freeze={"layers": 2}'],
            r"'freeze' has no option 'layers'; its options: extra_modules, trainable_layers",
        ),
        (
            ["--methods", "full", "--method_options", 'l2={"strength": 1}'],
            r"expected METHOD=JSON with METHOD",
        ),
        (
            ["--methods", "full,replay", "--replay_ratio", "1"],
            r"error: replay_ratio=1\.0 must be a number in \[0, 1\)",
        ),
        (
            ["--methods", "replay", "--replay_text", "lab", "--", "--model", "/ckpt", "--data", "a.jsonl"],
            r"error: replay_text='lab' needs model 'lab'",
        ),
        (
            ["--methods", "full,replay", "--", "--replay_ratio", "0.3"],
            r"pass them before `--`, not to every run",
        ),
        (
            ["--methods", "full,replay", "--replay_ratio", "0"],
            r"the replay entries \(replay\) need a ratio > 0",
        ),
        (["--methods", "full,mofo", "--replay_text", "g.jsonl"], r"no entry of --methods replays"),
    ],
    ids=[
        "bad-finetune-flag",
        "unknown-method",
        "lr-not-a-number",
        "lr-of-another-method",
        "seed-of-mofo",
        "bad-seed",
        "options-not-json",
        "unknown-option",
        "options-of-another-method",
        "replay-ratio-out-of-range",
        "replay-lab-for-a-checkpoint",
        "replay-flags-after-dashes",
        "replay-ratio-zero",
        "replay-text-without-replay",
    ],
)
def test_bad_input_is_one_line_with_status_2(tmp_path: Path, flags: list[str], message: str) -> None:
    """Catches compare.py starting a DeepSpeed run with flags it could have checked (the run then
    failed and compare.py ended with a CalledProcessError traceback), and an error reported with
    a traceback or a status a batch script cannot tell from a crash."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, str(REPO / "launch" / "compare.py"), "--output_dir", str(tmp_path), *flags]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "== " not in done.stdout, output[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), output[-3000:]
    assert not any(tmp_path.iterdir())  # no run started


def test_failed_run_ends_compare_with_its_status_and_no_traceback(tmp_path: Path) -> None:
    """A run that fails on input compare.py cannot check (a missing --data file) ended compare.py
    with a CalledProcessError traceback and status 1; it must end it with the run's status (2: a
    user error) and one line naming the run, after the run's own error line."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "launch" / "compare.py"), "--methods", "full"]
    command += ["--output_dir", str(tmp_path / "out"), "--", "--data", str(tmp_path / "absent.jsonl")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert re.search(r"error: data file .*absent\.jsonl does not exist \(--data\)", output), output[-3000:]
    assert done.stderr.rstrip().endswith("compare: the full run ended with status 2"), output[-3000:]


def test_replay_entry_runs_the_method_with_replay(tmp_path: Path) -> None:
    """``mofo+replay`` in --methods is a MoFO run with this command's --replay_ratio (the lab's
    corpus replayed by default); the run is started (it then fails on a missing --data file,
    which ends it in seconds) with those flags, in its own folder."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "launch" / "compare.py"), "--methods", "mofo+replay"]
    command += ["--replay_ratio", "0.2", "--output_dir", str(tmp_path / "out")]
    command += ["--", "--data", str(tmp_path / "absent.jsonl")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    started = [line for line in done.stdout.splitlines() if line.startswith("== mofo+replay: ")]
    assert len(started) == 1, output[-3000:]
    assert "--method mofo --output_dir " + str(tmp_path / "out" / "mofo+replay") in started[0]
    assert "--replay_ratio 0.2" in started[0] and "--replay_text" not in started[0]


def test_a_run_made_before_a_setting_existed_is_the_same_run(tmp_path: Path) -> None:
    """A compare folder whose config.json predates --replay_text/--replay_ratio (no such keys) is
    the run these flags would make when they are left at their defaults (no replay), and another
    run when replay is asked for. Catches every older folder refused as made with 'replay_ratio=None'."""
    from dsforget.experiments.subruns import previous_run
    from dsforget.train.run_config import parse_run_config

    flags = ["--method", "full", "--max_steps", "6"]
    saved = json.loads(json.dumps(parse_run_config(flags).to_dict()))
    del saved["replay_text"], saved["replay_ratio"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert previous_run(tmp_path, flags) == "started"
    with pytest.raises(ConfigError, match="replay_ratio=0.0 there, 0.1 here"):
        previous_run(tmp_path, [*flags, "--replay_ratio", "0.1"])
