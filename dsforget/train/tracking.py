"""Experiment tracking (--report_to): the metrics.jsonl records and the forgetting report, sent to
TensorBoard, Weights & Biases or MLflow, from rank 0 only.

Each tracker takes its usual environment: wandb ``WANDB_PROJECT`` (default ``dsforget``),
``WANDB_MODE=offline``, ``WANDB_DIR`` (default output_dir); MLflow ``MLFLOW_TRACKING_URI`` (its
own default otherwise) and ``MLFLOW_EXPERIMENT_NAME`` (default ``dsforget``). Every attempt of a
run (a resume, a restart) is its own tracker run, named after output_dir; metrics.jsonl stays the
record of the whole run.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
# the package each tracker imports, and the setup.py extra that installs it
PACKAGES = {
    "tensorboard": ("tensorboard", "dsforget"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


def parse_report_to(value: str) -> list[str]:
    """--report_to as a list of trackers ("none": none), each installed; else a ConfigError."""
    names = [name.strip() for name in value.split(",")]
    if names == ["none"]:
        return []
    unknown = [name for name in names if name not in TRACKERS]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(
            f"report_to={value!r}: {'unknown ' + repr(unknown[0]) if unknown else 'a tracker repeats'}; "
            f"choose from {', '.join(TRACKERS)} (comma-separated), or none"
        )
    for name in names:
        package, extra = PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"report_to={value!r}: {name} is not installed (pip install 'dsforget[{extra}]')"
            )
    return names


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The forgetting report's numbers as flat summary metrics: ``summary/...`` (task gain,
    forgetting), ``before/...`` and ``after/...`` (every score), ``drift/all/...``, ``train/...``
    (step time, optimizer state) and ``trainable_share``."""
    metrics: dict[str, float] = {}
    for section in ("summary", "before", "after"):
        metrics.update({f"{section}/{key}": value for key, value in report.get(section, {}).items()})
    metrics.update(
        {f"drift/all/{key}": value for key, value in report.get("drift", {}).get("all", {}).items()}
    )
    metrics.update({f"train/{key}": value for key, value in report["train"].items() if key != "world_size"})
    metrics["trainable_share"] = report["trainable_share"]
    return {key: float(value) for key, value in metrics.items() if isinstance(value, int | float)}


class Tracker(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def summary(self, metrics: Mapping[str, float], report: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """Scalars under output_dir/tensorboard; the summary as scalars at the last step."""

    def __init__(self, output_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def summary(self, metrics: Mapping[str, float], report: Mapping[str, Any]) -> None:
        self.log(metrics, report["train"]["steps"])

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A wandb run with the run config; the summary in ``run.summary``."""

    def __init__(self, output_dir: Path, config: Mapping[str, Any]) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dsforget"),
            name=output_dir.name,
            dir=os.environ.get("WANDB_DIR", str(output_dir)),
            config=dict(config),
        )

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def summary(self, metrics: Mapping[str, float], report: Mapping[str, Any]) -> None:
        self.run.summary.update(dict(metrics))

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run with the run config as parameters; the summary as metrics and report.json as
    an artifact."""

    def __init__(self, output_dir: Path, config: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "dsforget"))
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=output_dir.name)
        mlflow.log_params({key: str(value)[:500] for key, value in config.items()})  # MLflow's value limit

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.mlflow.log_metrics(dict(metrics), step=step)

    def summary(self, metrics: Mapping[str, float], report: Mapping[str, Any]) -> None:
        self.mlflow.log_metrics(dict(metrics), step=report["train"]["steps"])
        self.mlflow.log_dict(dict(report), "report.json")

    def close(self) -> None:
        self.mlflow.end_run()


class TrackerError(ConfigError):
    """A tracker that could not start with this environment."""


def open_trackers(names: list[str], output_dir: Path, config: Mapping[str, Any]) -> Trackers | None:
    """The trackers on rank 0 (None elsewhere); a tracker that cannot start is an error on every
    rank (rank 0's error broadcast), not a crash of rank 0 that the others wait out. Collective."""
    from deepspeed import comm

    trackers, message = None, [None]
    if comm.get_rank() == 0:
        try:
            trackers = Trackers(names, output_dir, config)
        except TrackerError as error:
            message = [str(error)]
    comm.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise TrackerError(message[0])
    return trackers


class Trackers:
    """Every tracker --report_to names (build on rank 0 only)."""

    def __init__(self, names: list[str], output_dir: Path, config: Mapping[str, Any]) -> None:
        makers = {
            "tensorboard": lambda: TensorBoard(output_dir),
            "wandb": lambda: WandB(output_dir, config),
            "mlflow": lambda: MLflow(output_dir, config),
        }
        self.trackers: list[Tracker] = []
        for name in names:
            try:
                self.trackers.append(makers[name]())
            except Exception as error:  # a tracker's own errors (login, store, server) vary by package
                self.close()
                raise TrackerError(
                    f"report_to: {name} did not start ({type(error).__name__}: {error}); see README "
                    "'Experiment tracking' for its environment"
                ) from error

    def log(self, record: Mapping[str, Any]) -> None:
        """A metrics.jsonl record: its numbers at its step."""
        metrics = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, float | int)}
        for tracker in self.trackers:
            tracker.log(metrics, record["step"])

    def summary(self, report: Mapping[str, Any]) -> None:
        metrics = report_metrics(report)
        for tracker in self.trackers:
            tracker.summary(metrics, report)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
