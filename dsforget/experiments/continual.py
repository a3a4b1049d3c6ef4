"""Continual learning: a run as a list of stages, each fine-tuned from the previous stage's weights.

A stages file (YAML or JSON) holds the settings every stage shares and one entry per stage:

    run: {method: hft, lab_preset: tiny, epochs: 2}    # any launch/finetune.py key
    stages:
      - {name: reverse, lab_task: reverse}             # a lab task (dsforget.lab.tasks) ...
      - {name: sort, lab_task: sort, lr: 5e-4}         # ... with per-stage overrides
      - {name: mine, data: a.jsonl, eval_data: a_eval.jsonl}   # or user files

Stage i trains from stage i−1's exported checkpoint with seed ``run.seed + i``, so HFT draws a
new half per stage (the paper's rule) from the weights the previous stage left. After every
stage, every task seen so far is scored again: the matrix of scores gives backward transfer
(how much learning later tasks cost the earlier ones).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..atomic import write_atomic
from ..strict_json import dumps
from ..train.run_config import FIELDS, RunConfig

SET_PER_STAGE = ("output_dir", "init_from", "data", "eval_data", "resume")


@dataclass(frozen=True)
class Stage:
    name: str
    lab_task: str | None = None
    data: str | None = None
    eval_data: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StagesFile:
    run: Mapping[str, Any]
    stages: tuple[Stage, ...]


def _check_keys(values: Mapping[str, Any], where: str) -> None:
    for key in values:
        if key in SET_PER_STAGE:
            raise ValueError(f"{where}: '{key}' is set by the continual driver for each stage")
        if key not in FIELDS:
            raise ValueError(f"{where}: unknown run config key '{key}'")


def read_stages(path: str | Path) -> StagesFile:
    """The stages file at `path`, checked: errors name the file, the stage and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"stages file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ValueError(f"stages file {path}: cannot parse ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise ValueError(f"stages file {path}: needs a non-empty list under 'stages'")
    unknown = set(data) - {"run", "stages"}
    if unknown:
        raise ValueError(
            f"stages file {path}: unknown top-level key(s) {sorted(unknown)}; allowed: run, stages"
        )
    run = data.get("run") or {}
    _check_keys(run, f"{path}: run")
    stages = []
    for index, entry in enumerate(data["stages"]):
        where = f"{path}: stages[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"{where}: each stage is a mapping with a 'name'")
        own = {k: entry[k] for k in ("lab_task", "data", "eval_data") if k in entry}
        if ("lab_task" in own) == ("data" in own):
            raise ValueError(f"{where}: give either 'lab_task' or 'data' (with 'eval_data')")
        if "data" in own and "eval_data" not in own:
            raise ValueError(f"{where}: 'data' needs an 'eval_data' file to score the stage's task")
        overrides = {k: v for k, v in entry.items() if k not in ("name", "lab_task", "data", "eval_data")}
        _check_keys(overrides, where)
        stages.append(Stage(name=entry["name"], overrides=overrides, **own))
    names = [stage.name for stage in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stages file {path}: stage names must be distinct, got {names}")
    return StagesFile(run=run, stages=tuple(stages))


def stage_dir(output_dir: str | Path, index: int, stage: Stage) -> Path:
    return Path(output_dir) / f"stage{index}-{stage.name}"


def stage_run_config(
    stages: StagesFile, index: int, output_dir: str | Path, train: str, evaluation: str, init: str | None
) -> dict[str, Any]:
    """The finetune run config of stage `index` (validated by RunConfig before anything runs)."""
    stage = stages.stages[index]
    values = {**stages.run, **stage.overrides}
    values["seed"] = int(values.get("seed", FIELDS["seed"].default)) + index
    values.update(output_dir=str(stage_dir(output_dir, index, stage)), data=train, eval_data=evaluation)
    values["export"] = True  # the next stage starts from this stage's exported checkpoint
    if init is not None:
        if values.get("model", "lab") == "lab":
            values["init_from"] = init
        else:
            values["model"] = init
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    try:
        RunConfig(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"stage {index} ({stage.name}): {err}") from None
    return values


def transfer_matrix(scores: Sequence[Mapping[str, float]], tasks: Sequence[str]) -> dict[str, Any]:
    """Backward transfer from `scores[i][task]`, the score of `task` after stage i.

    BWT = mean over tasks j < last of (score after the last stage − score right after stage j).
    """
    last = len(scores) - 1
    changes = [scores[last][task] - scores[j][task] for j, task in enumerate(tasks[:last])]
    return {"backward_transfer": sum(changes) / len(changes) if changes else None, "per_task_change": changes}


def format_table(result: Mapping[str, Any]) -> str:
    """Task scores (rows: after each stage; '-' = not yet learned) and general metrics."""
    tasks = result["tasks"]
    general = sorted({k for row in result["general"] for k in row})
    columns = [*tasks, *general]
    widths = [max(10, len(c) + 2) for c in columns]
    lines = [f"{'after stage':<18}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))]
    for label, row, extra in zip(result["rows"], result["task_scores"], result["general"], strict=True):
        values = [row.get(t) for t in tasks] + [extra.get(g) for g in general]
        cells = [
            f"{'-' if v is None else format(v, '.4g'):>{w}}" for v, w in zip(values, widths, strict=True)
        ]
        lines.append(f"{label:<18}" + "".join(cells))
    bwt = result["transfer"]["backward_transfer"]
    lines.append(f"backward transfer: {'-' if bwt is None else format(bwt, '+.3f')}")
    return "\n".join(lines)


def write_result(result: Mapping[str, Any], output_dir: str | Path) -> Path:
    path = Path(output_dir) / "continual.json"
    write_atomic(path, dumps(result, indent=2) + "\n")
    return path
