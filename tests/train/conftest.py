"""The one compare.py run that the compare tests of test_finetune, test_baselines_job and
test_lora_job read: every run is a 2-rank DeepSpeed job (about 25 s on 2 cores, most of it
start-up), so the methods they look at run side by side once, against one full run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from launcher import REPO
from test_finetune import TINY_RUN

# test_finetune: every method on the same data, an lr sweep, two plan seeds, eval along training;
# test_baselines_job: freeze and l2 with options of their own; test_lora_job: lora's adapters.
METHODS = "full,mofo,hft,freeze,l2,lora"
OPTIONS = {"freeze": {"trainable_layers": 1}, "l2": {"strength": 10}, "lora": {"rank": 4}}


@dataclass(frozen=True)
class Compared:
    output: Path  # compare.py's --output_dir
    command: list[str]  # the command that made it: a rerun reuses every run
    env: dict[str, str]
    done: subprocess.CompletedProcess

    def row_names(self, names: tuple[str, ...]) -> set[str]:
        """The table rows of these runs that the command printed."""
        lines = self.done.stdout.splitlines()
        return {line.split()[0] for line in lines if line.startswith(tuple(f"{name} " for name in names))}


@pytest.fixture(scope="session")
def compared(tmp_path_factory, lab_cache: Path) -> Compared:
    output = tmp_path_factory.mktemp("compare")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "DSFORGET_CACHE": str(lab_cache)}
    command = [sys.executable, str(REPO / "launch" / "compare.py"), "--methods", METHODS]
    command += ["--lrs", "mofo=1e-3,2e-3", "--plan_seeds", "hft=0,1"]
    command += ["--method_options", *(f"{method}={json.dumps(value)}" for method, value in OPTIONS.items())]
    command += ["--output_dir", str(output), "--", *TINY_RUN, "--max_steps", "6", "--eval_every", "3"]
    command += ["--no-export"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Compared(output, command, env, done)
