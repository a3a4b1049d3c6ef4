"""--report_to: TensorBoard, Weights & Biases and MLflow, each writing its run offline (wandb's
offline mode, an MLflow file store under tmp), the forgetting report's numbers as summary metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launcher import REPO, RankFailure, run_ranks
from test_finetune import finetune

from dsforget.errors import ConfigError
from dsforget.train.run_config import RunConfig
from dsforget.train.tracking import Trackers, report_metrics

REPORT = {
    "summary": {"task_gain": 0.25, "fact_recall_lost": 0.125},
    "before": {"task_exact_match": 0.0, "fact_recall": 1.0},
    "after": {"task_exact_match": 0.25, "fact_recall": 0.875},
    "drift": {"all": {"relative_l2": 0.01, "changed_fraction": 0.5}, "mlp": {"relative_l2": 0.02}},
    "train": {"steps": 2, "median_step_ms": 10.0, "validation_loss": None, "world_size": 2},
    "trainable_share": 0.05,
    "method": "lora",
}


@pytest.fixture
def offline(tmp_path: Path, monkeypatch) -> Path:
    """wandb offline and an MLflow file store in tmp_path (nothing leaves the machine)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores otherwise
    return tmp_path


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_runs(store: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{store}")
    return [run for exp in client.search_experiments() for run in client.search_runs([exp.experiment_id])]


def wandb_runs(directory: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted((directory / "wandb").glob("offline-run-*/run-*.wandb"))]


def test_report_to_is_checked() -> None:
    assert RunConfig(report_to="none").report_to == "none"
    with pytest.raises(ConfigError, match=r"report_to='tensorboard,comet': unknown 'comet'; choose from"):
        RunConfig(report_to="tensorboard,comet")
    with pytest.raises(ConfigError, match="a tracker repeats"):
        RunConfig(report_to="wandb,wandb")


def test_report_metrics_are_the_reports_numbers() -> None:
    metrics = report_metrics(REPORT)
    assert metrics["summary/task_gain"] == 0.25 and metrics["after/fact_recall"] == 0.875
    assert metrics["drift/all/relative_l2"] == 0.01 and "drift/mlp/relative_l2" not in metrics
    assert metrics["train/median_step_ms"] == 10.0 and "train/validation_loss" not in metrics
    assert "train/world_size" not in metrics and metrics["trainable_share"] == 0.05


def test_each_tracker_writes_its_run_offline(offline: Path) -> None:
    """Step metrics at their steps and the report's numbers as the run's summary, in each tracker's
    own format, read back with its own reader."""
    output = offline / "run"
    output.mkdir()
    trackers = Trackers(
        ["tensorboard", "wandb", "mlflow"], output, {"lr": 1e-3, "method_options": {"rank": 4}}
    )
    trackers.log({"step": 1, "loss": 2.0, "preempted": "no"})
    trackers.log({"step": 2, "loss": 1.5})
    trackers.summary(REPORT)
    trackers.close()

    scalars = tensorboard_scalars(output / "tensorboard")
    assert scalars["loss"] == [(1, 2.0), (2, 1.5)] and scalars["summary/task_gain"] == [(2, 0.25)]
    (run,) = mlflow_runs(offline / "mlruns")
    assert run.data.metrics["loss"] == 1.5 and run.data.metrics["summary/fact_recall_lost"] == 0.125
    assert run.data.params["lr"] == "0.001" and run.info.run_name == "run"
    (log,) = wandb_runs(output)
    assert b"summary/task_gain" in log and b"loss" in log


@pytest.mark.distributed
def test_the_job_reports_to_every_tracker_from_rank_0(offline: Path, lab_cache: Path) -> None:
    """Two ranks, all three trackers: one run in each (rank 1 logs nothing), holding report.json's
    summary and before/after numbers."""
    run = offline / "job"
    finetune(
        run,
        lab_cache,
        *("--method", "full", "--max_steps", "2", "--log_every", "1", "--eval_max_examples", "8"),
        *("--no-export", "--report_to", "tensorboard,wandb,mlflow"),
    )
    report = json.loads((run / "report.json").read_text())
    (mlflow_run,) = mlflow_runs(offline / "mlruns")
    expected = report_metrics(report)
    assert {k: mlflow_run.data.metrics[k] for k in expected} == pytest.approx(expected)
    assert mlflow_run.data.params["method"] == "full"
    (log,) = wandb_runs(run)
    assert all(key.encode() in log for key in expected if key.startswith(("summary/", "before/", "after/")))
    scalars = tensorboard_scalars(run / "tensorboard")
    assert scalars["loss"][0][0] == 1 and scalars["summary/task_gain"] == [(2, expected["summary/task_gain"])]


@pytest.mark.distributed
def test_a_tracker_that_cannot_start_stops_every_rank_in_one_line(
    tmp_path: Path, tiny_model: Path, monkeypatch
) -> None:
    """MLflow 3 refuses a file store without MLFLOW_ALLOW_FILE_STORE: rank 0's error reaches both
    ranks (status 2, one 'error:' line) instead of rank 1 waiting out the collective timeout."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    data = tmp_path / "ok.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n' * 40)
    argv = [str(REPO / "launch" / "finetune.py"), "--model", str(tiny_model), "--data", str(data)]
    argv += ["--max_steps", "1", "--report_to", "mlflow", "--output_dir", str(tmp_path / "run")]
    with pytest.raises(RankFailure) as failure:
        run_ranks(argv, world_size=2, timeout=300)
    everything = "\n".join(failure.value.outputs)
    assert failure.value.ranks == [0, 1] and everything.count("error:") == 1, everything[-3000:]
    assert "error: report_to: mlflow did not start (MlflowException: " in failure.value.outputs[0]
    assert "Traceback" not in everything, everything[-3000:]
