"""Continual learning: fine-tune on a sequence of tasks and score every earlier task after each stage.

    python launch/continual.py --stages configs/continual_lab.yaml            # the lab: 3 tasks with HFT
    python launch/continual.py --stages configs/continual_lab.yaml -- --method full   # the baseline
    python launch/continual.py --stages stages.yaml --num_gpus 8 -- --lr 1e-5

Each stage is one launch/finetune.py run (DeepSpeed's launcher; all GPUs, or 2 CPU ranks) into
<output_dir>/stage<i>-<name>/, starting from the previous stage's exported checkpoint; flags
after `--` go to every stage. A rerun skips finished stages and resumes an interrupted one.
The score matrix, general metrics after each stage and backward transfer are printed and
written to <output_dir>/continual.json. The stages file format: dsforget/experiments/continual.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsforget.data import load_conversations
from dsforget.errors import run_main
from dsforget.experiments.continual import (
    StagesFile,
    format_table,
    read_stages,
    stage_dir,
    stage_run_config,
    transfer_matrix,
    write_result,
)
from dsforget.experiments.subruns import finetune_command, split_passthrough, subrun_env
from dsforget.lab import LabArtifacts, LabConfig, build_lab, task_exact_match
from dsforget.lab.tasks import write_lab_task

DRIVER_KEYS = (
    "--output_dir",
    "--data",
    "--eval_data",
    "--init_from",
    "--config",
    "--seed",
    "--model",
    "--lab_preset",
    "--export",
    "--no-export",
)


def lab_of(stages: StagesFile) -> LabArtifacts | None:
    """The lab the stages run on (built once, then cached), or None for a checkpoint directory."""
    if stages.run.get("model", "lab") != "lab":
        return None
    return build_lab(LabConfig.preset(stages.run.get("lab_preset", "default")))


def task_files(stages: StagesFile, lab: LabArtifacts | None, output: Path) -> list[tuple[str, str]]:
    """(train, eval) file of each stage; lab tasks are written under <output>/tasks."""
    files = []
    for index, stage in enumerate(stages.stages):
        if stage.lab_task is None:
            files.append((stage.data, stage.eval_data))
        elif lab is None:
            raise ValueError(f"stages[{index}] ({stage.name}) names a lab task, but run.model is not 'lab'")
        else:
            train, evaluation = write_lab_task(lab, stage.lab_task, output / "tasks")
            files.append((str(train), str(evaluation)))
    return files


def scores_of(model_dir: Path | str, tasks: list[list[dict]], limit: int) -> list[float]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [task_exact_match(model, tokenizer, records[:limit]) for records in tasks]


def main(argv: list[str]) -> None:
    ours, finetune_flags = split_passthrough(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--stages", required=True, help="YAML/JSON stages file (see dsforget/experiments/continual.py)"
    )
    parser.add_argument("--output_dir", default="runs/continual", help="one sub-directory per stage")
    parser.add_argument(
        "--num_gpus", type=int, default=None, help="ranks per stage (default: all GPUs, or 2 CPU)"
    )
    args = parser.parse_args(ours)
    clash = [flag for flag in finetune_flags if flag.split("=")[0] in DRIVER_KEYS]
    if clash:
        parser.error(f"{clash[0]} is set per stage by continual.py (use the stages file's 'run' mapping)")
    stages = read_stages(args.stages)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    lab = lab_of(stages)
    files = task_files(stages, lab, output)
    configs, previous = [], None
    for index in range(len(stages.stages)):  # every stage's config is checked before the first runs
        configs.append(stage_run_config(stages, index, output, *files[index], previous))
        previous = str(stage_dir(output, index, stages.stages[index]) / "hf_model")

    limit = int(stages.run.get("eval_max_examples", 200))
    tasks = [[{"messages": c} for c in load_conversations(evaluation)] for _, evaluation in files]
    names = [stage.name for stage in stages.stages]
    base_dir = lab.model_dir if lab is not None else stages.run["model"]
    rows, task_scores, general = (
        ["base"],
        [dict(zip(names, scores_of(base_dir, tasks, limit), strict=True))],
        [],
    )
    for index, stage in enumerate(stages.stages):
        directory = stage_dir(output, index, stage)
        if not (directory / "report.json").exists() or not (directory / "hf_model" / "config.json").exists():
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "stage_config.yaml").write_text(yaml.safe_dump(configs[index], sort_keys=False))
            command = finetune_command(args.num_gpus, "--config", str(directory / "stage_config.yaml"))
            print(f"== stage {index} ({stage.name}): {' '.join(command + finetune_flags)}", flush=True)
            subprocess.run(command + finetune_flags, check=True, env=subrun_env())
        report = json.loads((directory / "report.json").read_text())
        if index == 0:
            general.append({k: v for k, v in report["before"].items() if k != "task_exact_match"})
        general.append({k: v for k, v in report["after"].items() if k != "task_exact_match"})
        seen = scores_of(directory / "hf_model", tasks[: index + 1], limit)
        task_scores.append(dict(zip(names[: index + 1], seen, strict=True)))
        rows.append(f"{index} {stage.name}")
    learned = [task_scores[j + 1] for j in range(len(names))]  # row after stage j, for its task j
    result = {
        "stages_file": str(args.stages),
        "method": json.loads((stage_dir(output, 0, stages.stages[0]) / "report.json").read_text())["method"],
        "tasks": names,
        "rows": rows,
        "task_scores": task_scores,
        "general": general,
        "transfer": transfer_matrix(learned, names),
    }
    path = write_result(result, output)
    print(f"\n{format_table(result)}\n\n{path}", flush=True)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])  # a user error: one line on rank 0, status 2
