"""Search CoFiTune's coarse level: which module set (mha, ffn, both) in which layers to train.

    python launch/cofitune_search.py --config configs/cofitune_search_lab.yaml --trial_steps 60
    python launch/cofitune_search.py --search_dir runs/search-8b --trial_steps 200 --lambda 1 \\
        --num_gpus 8 -- --model /ckpt/Llama-3.1-8B --data sft.jsonl --eval_data eval.jsonl \\
        --general_text general.jsonl --lr 1e-5 --deepspeed configs/zero3.json
    deepspeed --num_gpus 8 launch/finetune.py --config runs/cofitune-search/chosen.yaml   # the winner

The base run settings are a --config file and/or launch/finetune.py flags after `--`; every trial
runs them with method cofitune, its candidate's layers/modules, --trial_steps steps and its own
output_dir <search_dir>/trials/<modules>_<layers>/ (log.txt, run.yaml, report.json), under
DeepSpeed's launcher on 2 CPU ranks without a GPU, or all GPUs (--num_gpus to choose). The tree
search, the score and the state file are described in dsforget/experiments/cofitune_search.py.
Running the same command again resumes: recorded trials are not rerun (failed ones only with --retry_failed).
Outputs: ranking.json, the printed ranking table, and chosen.yaml, the base settings with the
best candidate, ready for launch/finetune.py --config.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsforget.atomic import write_atomic
from dsforget.errors import run_main
from dsforget.experiments.cofitune_search import (
    Candidate,
    SearchConfig,
    SearchResult,
    TrialResult,
    base_run_values,
    chosen_run_values,
    ranking_table,
    tree_search,
    trial_run_values,
    write_run_config,
)
from dsforget.experiments.subruns import finetune_command, local_accelerator, subrun_env
from dsforget.methods.cofitune.plan import MODULE_SETS
from dsforget.strict_json import dumps
from dsforget.train.run_config import RunConfig


class TrialFailed(RuntimeError):
    pass


@dataclass
class SubprocessTrial:
    """run_trial for the search: launch/finetune.py under DeepSpeed's launcher, then its report.json."""

    num_gpus: int | None  # None: all GPUs, or 2 CPU ranks
    env: dict[str, str]
    base: dict[str, Any]
    trial_steps: int | None
    trials_dir: Path
    timeout: float | None
    keep_checkpoints: bool

    def __call__(self, candidate: Candidate) -> TrialResult:
        run_dir = self.trials_dir / f"{candidate.modules}_{candidate.layers}"
        run_dir.mkdir(parents=True, exist_ok=True)
        config_file = run_dir / "run.yaml"
        write_run_config(config_file, trial_run_values(self.base, candidate, run_dir, self.trial_steps))
        (run_dir / "report.json").unlink(missing_ok=True)  # only this run's report counts
        command = finetune_command(self.num_gpus, "--config", str(config_file))
        log_file = run_dir / "log.txt"
        print(f"    {' '.join(command)}\n    log: {log_file}", flush=True)
        with open(log_file, "a") as log:  # a file, not a pipe: a full pipe would stall the ranks
            log.write(f"== {' '.join(command)}\n")
            log.flush()
            # own process group, so a timeout or Ctrl-C stops the launcher's ranks too
            process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                returncode = process.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                stop(process)
                raise TrialFailed(
                    f"no result within --trial_timeout {self.timeout} s; log: {log_file}"
                ) from None
            except BaseException:
                stop(process)
                raise
        if returncode != 0:
            raise TrialFailed(f"exit code {returncode}: {first_exception(log_file)}; log: {log_file}")
        report = json.loads((run_dir / "report.json").read_text())
        if not self.keep_checkpoints:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return TrialResult(
            before=report["before"],
            after=report["after"],
            details={
                "output_dir": str(run_dir),
                "trainable_share": report.get("trainable_share"),
                "steps": report["train"]["steps"],
                "train_seconds": report["train"]["seconds"],
                "drift_relative_l2": report["drift"]["all"]["relative_l2"],
            },
        )


# the last line of a Python traceback, as a rank prints it: "[rank0]: FileNotFoundError: ..."
EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt): .*)$")


def first_exception(log_file: Path) -> str:
    """The first exception in a trial's log: the root cause (the other ranks' errors follow it)."""
    for line in log_file.read_text(errors="replace").splitlines():
        match = EXCEPTION_LINE.match(line)
        if match:
            return match.group(1)
    return "no Python exception in the log"


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the trial's process group, SIGKILL it after 30 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def count_layers(run: RunConfig) -> int:
    if run.uses_lab:
        from dsforget.lab import LabConfig

        return LabConfig.preset(run.lab_preset).num_layers
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(run.model).num_hidden_layers


def parse(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any], SearchConfig]:
    ours, finetune_flags = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", help="base run settings (YAML/JSON, as launch/finetune.py --config)")
    parser.add_argument("--search_dir", default="runs/cofitune-search", help="state, trials and results")
    parser.add_argument(
        "--budget", type=int, default=None, help="trials in all, across restarts (default: the whole tree)"
    )
    parser.add_argument(
        "--lambda",
        "--versatility_weight",
        dest="versatility_weight",
        type=float,
        default=1.0,
        help="score = speciality + lambda * (versatility - 1) (default: 1)",
    )
    parser.add_argument(
        "--trial_steps", type=int, default=None, help="max_steps of each trial (default: the base settings')"
    )
    parser.add_argument(
        "--module_sets",
        default=",".join(MODULE_SETS),
        help=f"module sets to try (default: {','.join(MODULE_SETS)})",
    )
    parser.add_argument(
        "--refine_module_sets", type=int, default=1, help="module sets refined into quarters (default: 1)"
    )
    parser.add_argument("--retry_failed", action="store_true", help="rerun trials recorded as failed")
    parser.add_argument("--trial_timeout", type=float, default=None, help="seconds per trial (default: none)")
    parser.add_argument("--keep_trial_checkpoints", action="store_true", help="keep trials' checkpoints/")
    parser.add_argument(
        "--num_gpus", type=int, default=None, help="ranks per trial (default: all GPUs, or 2 CPU ranks)"
    )
    args = parser.parse_args(ours)
    if args.trial_steps is not None and args.trial_steps < 1:
        parser.error(f"--trial_steps {args.trial_steps} must be >= 1")
    try:
        base = base_run_values(args.config, finetune_flags)
        run = RunConfig(**base)
        search = SearchConfig(
            n_layers=count_layers(run),
            budget=args.budget,
            versatility_weight=args.versatility_weight,
            module_sets=tuple(args.module_sets.split(",")),
            refine_module_sets=args.refine_module_sets,
            retry_failed=args.retry_failed,
        )
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if not run.uses_lab and not (run.eval_data and run.general_text):
        parser.error("the search scores the task and general ability: give --eval_data and --general_text")
    return args, base, search


def report(result: SearchResult, search_dir: Path, base: dict[str, Any], launch_words: list[str]) -> None:
    """ranking.json, the printed table and chosen.yaml (exits non-zero when no trial succeeded)."""
    write_atomic(search_dir / "ranking.json", dumps(result.to_dict(), indent=2) + "\n")
    print(f"\n{ranking_table(result)}\n", flush=True)
    if not result.complete:
        print("budget used before the tree was finished; raise --budget and rerun to go on", flush=True)
    chosen = result.chosen
    if chosen is None:
        sys.exit(f"no trial succeeded; see the errors above and in {search_dir / 'ranking.json'}")
    candidate = chosen.record.candidate
    chosen_file = search_dir / "chosen.yaml"
    write_run_config(
        chosen_file,
        chosen_run_values(base, candidate),
        comments=[
            " ".join([*launch_words, "launch/finetune.py", "--config", str(chosen_file)]),
            f"CoFiTune coarse level chosen by launch/cofitune_search.py: {candidate.key}, score "
            f"{chosen.score.value:+.4f} (lambda {result.config.versatility_weight}); "
            f"ranking in {search_dir / 'ranking.json'}",
        ],
    )
    print(f"chosen: {candidate.key}\n{search_dir / 'ranking.json'}, {chosen_file}", flush=True)


def main(argv: list[str]) -> None:
    args, base, search = parse(argv)
    # ranks as launch/compare.py and the Makefile pick them: 2 CPU ranks without a GPU, else all GPUs
    accelerator = local_accelerator()
    cpu = accelerator == "cpu"
    num_gpus = ["--num_gpus", str(args.num_gpus or 2)] if (cpu or args.num_gpus) else []
    search_dir = Path(args.search_dir)
    settings = {  # what one trial measures depends on these; a resume must not change them
        "base_run": base,
        "trial_steps": args.trial_steps,
        "accelerator": accelerator,
        "ranks": args.num_gpus or (2 if cpu else "all"),
        "n_layers": search.n_layers,
    }
    trial = SubprocessTrial(
        args.num_gpus,
        subrun_env(),
        base,
        args.trial_steps,
        search_dir / "trials",
        args.trial_timeout,
        args.keep_trial_checkpoints,
    )
    result = tree_search(
        search, trial, search_dir / "trials.jsonl", settings, log=lambda line: print(line, flush=True)
    )
    report(result, search_dir, base, [*(["DS_ACCELERATOR=cpu"] if cpu else []), "deepspeed", *num_gpus])


if __name__ == "__main__":
    run_main(main, sys.argv[1:])  # a user error: one line on rank 0, status 2
