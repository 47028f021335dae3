"""Experiment trackers of ``run.loggers``: TensorBoard, Weights & Biases, MLflow (rank 0 only).

``csv`` (``metrics.csv`` / ``metrics.jsonl`` / ``log.txt``) is the runner's own and always written; the
trackers here get the same per-epoch records on top. The runner starts them on the main process only,
after it has written ``recipe.yaml``, and hands them the resolved recipe, which wandb and MLflow keep as
the run's config. Each tracker's package is imported only when the recipe lists it (validation has
already said which pip package is missing, see :meth:`RunSettings.logger_problems`).

* ``tensorboard``: ``output_dir/tensorboard`` (epoch records only, as before).
* ``wandb``: ``wandb.init(dir=output_dir, mode=run.wandb_mode)``; offline (the default) writes
  ``output_dir/wandb/offline-run-*`` and nothing leaves the machine. The run id is kept in
  ``output_dir/wandb_run_id`` so ``--resume`` continues the same run.
* ``mlflow``: ``MlflowClient(run.mlflow_tracking_uri)``; null is a file store at ``output_dir/mlruns``
  (MLflow >= 3 wants ``MLFLOW_ALLOW_FILE_STORE=true`` for that: set for this process unless already set).
  The recipe goes in flattened as params and whole as the artifact ``recipe.yaml``; the run id is kept in
  ``output_dir/mlflow_run_id``.

A tracker that fails while logging is reported once and dropped; the run goes on (the CSV/JSONL files
hold every record anyway). One that cannot start stops the run with an error saying why.
"""
from __future__ import annotations

import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional

from lever_plugins.schemas.run import RunSettings, resolved_loggers

logger = logging.getLogger(__name__)

WANDB_RUN_ID_FILE = "wandb_run_id"
MLFLOW_RUN_ID_FILE = "mlflow_run_id"
_NOT_METRICS = ("epoch", "split", "best_epoch")


class TrackerError(RuntimeError):
    """A tracker could not start; the message names it and the cause."""


def _default(name: str) -> Any:
    field = RunSettings.__dataclass_fields__[name]
    return field.default


def run_setting(run_cfg: Mapping, name: str) -> Any:
    """``run.<name>`` from a run config (OmegaConf node or dict); the schema default when absent."""
    value = run_cfg.get(name, None) if hasattr(run_cfg, "get") else None
    if value is None:
        return _default(name)
    try:  # OmegaConf ListConfig -> list
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:
        pass
    return value


def metric_items(record: Mapping) -> dict[str, float]:
    """``{"<split>/<key>": value}`` for the numeric entries of a metrics record."""
    split = record.get("split", "train")
    return {f"{split}/{key}": float(value) for key, value in record.items()
            if key not in _NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)}


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts as ``{"a.b.c": "value"}`` (lists and scalars as text): MLflow params."""
    if isinstance(data, Mapping):
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: "null" if data is None else str(data)}


def _read_id(path: Path) -> Optional[str]:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, output_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, record: Mapping) -> None:
        if not isinstance(record.get("epoch"), int):
            return
        for key, value in metric_items(record).items():
            self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()

    def finish(self, status: str) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, output_dir: Path, recipe: dict, run_cfg: Mapping, resume: bool):
        import wandb

        id_path = output_dir / WANDB_RUN_ID_FILE
        run_id = (_read_id(id_path) if resume else None) or uuid.uuid4().hex[:8]
        self.run = wandb.init(
            project=run_setting(run_cfg, "wandb_project"),
            name=run_setting(run_cfg, "tracker_run_name") or output_dir.name,
            dir=str(output_dir),
            mode=run_setting(run_cfg, "wandb_mode"),
            config=recipe,
            id=run_id,
            resume="allow",
        )
        id_path.write_text(run_id + "\n", encoding="utf-8")
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        self.dir = self.run.dir

    def log(self, record: Mapping) -> None:
        items = metric_items(record)
        if isinstance(record.get("epoch"), int):
            self.run.log({"epoch": record["epoch"], **items})
        else:  # "evaluate" / "best": the final numbers of the run
            self.run.summary.update(items)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class MlflowTracker:
    name = "mlflow"
    _KEY = re.compile(r"[^\w\-. /]")

    def __init__(self, output_dir: Path, recipe: dict, run_cfg: Mapping, resume: bool):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = run_setting(run_cfg, "mlflow_tracking_uri") or (output_dir / "mlruns").as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        self.client = client = MlflowClient(tracking_uri=uri)
        name = run_setting(run_cfg, "mlflow_experiment")
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
        id_path = output_dir / MLFLOW_RUN_ID_FILE
        run_id = _read_id(id_path) if resume else None
        if run_id is not None:
            try:
                client.get_run(run_id)
            except Exception:  # the store was moved or wiped: start a new run
                run_id = None
        resumed = run_id is not None
        if run_id is None:
            run_id = client.create_run(experiment_id, run_name=run_setting(run_cfg, "tracker_run_name") or output_dir.name,
                                       tags={"lever_plugins.output_dir": str(output_dir)}).info.run_id
        else:
            client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        id_path.write_text(run_id + "\n", encoding="utf-8")
        if not resumed:  # params are immutable in MLflow: a resumed run keeps the ones it started with
            params = [Param(key[:250], value[:500]) for key, value in flatten(recipe).items()]
            for start in range(0, len(params), 100):
                client.log_batch(run_id, params=params[start:start + 100])
        client.log_dict(run_id, recipe, "recipe.yaml")
        self._last_epoch = 0

    def log(self, record: Mapping) -> None:
        from mlflow.entities import Metric

        epoch = record.get("epoch")
        if isinstance(epoch, int):
            self._last_epoch = epoch
        step = epoch if isinstance(epoch, int) else self._last_epoch
        now = int(time.time() * 1000)
        metrics = [Metric(self._KEY.sub("_", key), value, now, step) for key, value in metric_items(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


_TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The started trackers of a run; ``log`` and ``finish`` go to each."""

    def __init__(self, trackers: list):
        self.trackers = list(trackers)

    @property
    def names(self) -> list[str]:
        return [tracker.name for tracker in self.trackers]

    def get(self, name: str):
        return next((tracker for tracker in self.trackers if tracker.name == name), None)

    def log(self, record: Mapping) -> None:
        for tracker in list(self.trackers):
            try:
                tracker.log(record)
            except Exception as exc:  # the run goes on: metrics.jsonl / .csv hold every record
                logger.warning("%s: logging failed (%s: %s); it gets no more records in this run (metrics.jsonl "
                               "and metrics.csv have them all)", tracker.name, type(exc).__name__, exc)
                self.trackers.remove(tracker)

    def finish(self, status: str = "FINISHED") -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.finish(status)
            except Exception as exc:
                logger.warning("%s: closing failed (%s: %s)", tracker.name, type(exc).__name__, exc)


def start_trackers(output_dir: str, recipe: dict, run_cfg: Mapping, *, resume: bool = False) -> Trackers:
    """Start every tracker ``run.loggers`` names besides csv (call on the main process only)."""
    out = Path(output_dir)
    started = []
    for name in resolved_loggers(run_setting(run_cfg, "loggers")):
        if name == "csv":
            continue
        cls = _TRACKERS[name]
        try:
            started.append(cls(out) if name == "tensorboard" else cls(out, recipe, run_cfg, resume))
        except Exception as exc:
            for tracker in started:
                tracker.finish("FAILED")
            raise TrackerError(f"run.loggers: {name} could not start ({type(exc).__name__}: {exc})") from exc
    return Trackers(started)
