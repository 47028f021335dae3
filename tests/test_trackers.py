"""``run.loggers``: csv always, TensorBoard / wandb (offline) / MLflow (local file store) when listed and installed.

The schema checks run everywhere; each tracker's own test is skipped where its package is not installed
(CI installs ``.[test]``, which has none of them: ``pip install -e ".[wandb,mlflow,tensorboard]"`` adds them).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lever_plugins.schema import from_mapping
from lever_plugins.schemas import run as run_schema
from lever_plugins.schemas.run import RunSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "recipes", "demo", "cirr_gated.yaml")
RECIPE = {"model": {"arch": "lever_blip2_cir", "model_type": "tiny", "vision": {"width": 64}},
          "datasets": {"lever_cirr": {"root": "/data/cirr"}},
          "run": {"task": "lever_composed_retrieval", "init_lr": 0.002, "valid_splits": ["val"]}}
RECORDS = [
    {"epoch": 0, "split": "train", "loss": 2.0, "lr": 0.001},
    {"epoch": 0, "split": "val", "recall_at1": 10.0, "agg_metrics": 30.0, "best_epoch": 0},
    {"epoch": 1, "split": "train", "loss": 1.5, "lr": 0.0005},
    {"epoch": 1, "split": "val", "recall_at1": 12.5, "agg_metrics": 31.0, "best_epoch": 1},
    {"epoch": "best", "split": "test", "recall_at1": 11.0},
]


def _problems(**run) -> list[str]:
    problems: list[str] = []
    from_mapping(RunSettings, {"task": "t", "output_dir": "/tmp/out", **run}, "run", problems)
    return problems


# ------------------------------------------------------------------------------------------- schema
def test_default_is_csv_plus_tensorboard_when_installed():
    assert _problems() == []
    expected = ["csv"] + (["tensorboard"] if run_schema.logger_installed("tensorboard") else [])
    assert run_schema.resolved_loggers(None) == expected
    assert run_schema.resolved_loggers(["csv", "wandb", "csv"]) == ["csv", "wandb"]


def test_a_tracker_whose_package_is_missing_is_an_error_naming_the_pip_package(monkeypatch):
    monkeypatch.setattr(run_schema, "logger_installed", lambda name: False)
    problems = _problems(loggers=["csv", "tensorboard", "wandb", "mlflow"])
    assert problems == [
        "run.loggers: tensorboard needs the tensorboard package, which is not installed: pip install tensorboard",
        "run.loggers: wandb needs the wandb package, which is not installed: pip install wandb",
        "run.loggers: mlflow needs the mlflow-skinny package, which is not installed: pip install mlflow-skinny (or mlflow)",
    ]
    assert _problems(loggers=["csv"]) == []  # the default of a missing tensorboard: no error


def test_loggers_keys_are_checked(monkeypatch):
    monkeypatch.setattr(run_schema, "logger_installed", lambda name: True)
    assert _problems(loggers=["wandb"]) == [
        "run.loggers: csv is always written (metrics.csv / metrics.jsonl drive --resume and the run summary); "
        "list it too, e.g. [csv, wandb]"]
    assert _problems(loggers=["csv", "wandb", "wandb"]) == ["run.loggers: wandb listed more than once"]
    assert _problems(loggers=["csv", "slack"])[0].startswith("run.loggers[1]: expected one of 'csv', 'tensorboard'")
    assert _problems(loggers=["csv"], wandb_project="p", mlflow_experiment="e", tracker_run_name="n") == [
        "run.wandb_project: read only with wandb in loggers (loggers: [csv])",
        "run.mlflow_experiment: read only with mlflow in loggers (loggers: [csv])",
        "run.tracker_run_name: read only with wandb or mlflow in loggers",
    ]
    assert _problems(loggers=["csv", "wandb", "mlflow"], wandb_project="p", mlflow_experiment="e",
                     tracker_run_name="n", wandb_mode="online", mlflow_tracking_uri="sqlite:///x.db") == []


# ------------------------------------------------------------------------------------------ trackers
def test_a_tracker_that_fails_while_logging_is_dropped_and_the_run_goes_on(caplog):
    from lever_plugins.runners.trackers import Trackers

    class Broken:
        name = "broken"

        def log(self, record):
            raise ConnectionError("server went away")

        def finish(self, status):
            raise AssertionError("a dropped tracker is not finished")

    trackers = Trackers([Broken()])
    with caplog.at_level(logging.WARNING):
        trackers.log(RECORDS[0])
        trackers.log(RECORDS[1])
    assert [r.getMessage() for r in caplog.records] == [
        "broken: logging failed (ConnectionError: server went away); it gets no more records in this run "
        "(metrics.jsonl and metrics.csv have them all)"]
    trackers.finish()


def test_tensorboard_writes_epoch_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("torch")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lever_plugins.runners.trackers import start_trackers

    trackers = start_trackers(str(tmp_path), RECIPE, {"loggers": ["csv", "tensorboard"]})
    for record in RECORDS:
        trackers.log(record)
    trackers.finish()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/recall_at1")] == [(0, 10.0), (1, 12.5)]
    assert "train/best_epoch" not in events.Tags()["scalars"] and "test/recall_at1" not in events.Tags()["scalars"]


def test_wandb_offline_run_under_output_dir_with_the_recipe_as_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for variable in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    from lever_plugins.runners.trackers import start_trackers

    run_cfg = {"loggers": ["csv", "wandb"], "tracker_run_name": "gated-demo", "wandb_project": "lever-test"}
    trackers = start_trackers(str(tmp_path), RECIPE, run_cfg)
    run = trackers.get("wandb").run
    assert run.offline and run.name == "gated-demo" and run.project == "lever-test"
    assert run.config["model"]["arch"] == "lever_blip2_cir" and run.config["run"]["init_lr"] == 0.002
    for record in RECORDS:
        trackers.log(record)
    assert run.summary["val/recall_at1"] == 12.5 and run.summary["test/recall_at1"] == 11.0
    assert run.summary["epoch"] == 1
    run_id = run.id
    trackers.finish()
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    [run_file] = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = run_file.read_bytes()  # the records wandb sync would upload: config and history are in it
    assert b"lever_blip2_cir" in data and b"recall_at1" in data

    again = start_trackers(str(tmp_path), RECIPE, run_cfg, resume=True)  # --resume continues the same run
    assert again.get("wandb").run.id == run_id
    again.finish()


def test_mlflow_local_file_store_under_output_dir_with_the_recipe_as_params(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    from mlflow.tracking import MlflowClient

    from lever_plugins.runners.trackers import start_trackers

    run_cfg = {"loggers": ["csv", "mlflow"], "mlflow_experiment": "lever-test"}
    trackers = start_trackers(str(tmp_path), RECIPE, run_cfg)
    for record in RECORDS:
        trackers.log(record)
    trackers.finish()
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    assert client.get_experiment(run.info.experiment_id).name == "lever-test"
    assert run.data.params["model.arch"] == "lever_blip2_cir" and run.data.params["model.vision.width"] == "64"
    assert run.data.params["run.valid_splits"] == "['val']"
    history = client.get_metric_history(run_id, "val/recall_at1")
    assert [(m.step, m.value) for m in history] == [(0, 10.0), (1, 12.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "test/recall_at1")] == [(1, 11.0)]
    assert "val/best_epoch" not in run.data.metrics
    local = Path(client.download_artifacts(run_id, "recipe.yaml", str(tmp_path / "download")))
    assert yaml.safe_load(local.read_text()) == RECIPE

    again = start_trackers(str(tmp_path), {**RECIPE, "run": {**RECIPE["run"], "init_lr": 0.001}}, run_cfg, resume=True)
    again.log({"epoch": 2, "split": "train", "loss": 1.0})
    again.finish("FAILED")
    run = client.get_run(run_id)  # the same run, its params as it started (MLflow params are immutable)
    assert run.info.status == "FAILED" and run.data.params["run.init_lr"] == "0.002"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1, 2]


# ------------------------------------------------------------------------------- through the runner
@pytest.mark.slow
@pytest.mark.lavis
def test_run_with_wandb_and_mlflow_on_two_processes_logs_once_from_rank_0(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("lavis")
    with open(DEMO, encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle)
    recipe["run"].update(max_epoch=1, batch_size_train=8, batch_size_eval=16, progress_bar=False, test_splits=[],
                         save_gate_maps=0, output_dir=str(tmp_path / "out"), loggers=["csv", "wandb", "mlflow"],
                         tracker_run_name="demo")
    recipe["datasets"]["lever_cirr"].update(root=str(tmp_path / "demo_data"), splits=["train", "val"],
                                            max_train_samples=32, max_eval_samples=16)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_ERROR_REPORTING": "false", "WANDB_CONSOLE": "off"}
    for variable in ("WANDB_MODE", "WANDB_DIR", "MLFLOW_TRACKING_URI"):
        env.pop(variable, None)
    result = subprocess.run([sys.executable, "-m", "lever_plugins.cli", "run", str(path), "--nproc", "2"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "val"]

    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs  # rank 0 only
    assert b"lever_blip2_cir" in runs[0].read_bytes()

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3 reads a file store only with it
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name == "lever-plugins"]
    [run] = client.search_runs([experiment.experiment_id])  # rank 0 only
    assert run.info.status == "FINISHED" and run.info.run_name == "demo"
    assert run.data.params["run.loggers"] == "['csv', 'wandb', 'mlflow']"  # the resolved recipe
    assert run.data.params["model.arch"] == "lever_blip2_cir" and "run.init_lr" in run.data.params
    val = client.get_metric_history(run.info.run_id, "val/recall_at1")
    assert [m.value for m in val] == [records[1]["recall_at1"]]
