"""``lever_runner``: LAVIS's ``RunnerBase`` made to work on CPU, on GPU and under torchrun/gloo.

What it changes relative to LAVIS 1.0.2's runner (SPEC §8) and why:

* the model is moved and wrapped once (the stock ``model`` property returns None on CPU) and DDP is
  built with ``device_ids=None`` on CPU;
* plain DataLoaders (the stock ``PrefetchLoader`` creates a CUDA stream), with a seeded shuffle per
  epoch so a resumed run sees the same batches as an uninterrupted one;
* ``dist.barrier()`` only when a process group exists;
* outputs go to ``run.output_dir`` itself (absolute; never inside site-packages, no job-id subfolder),
  so that ``--resume`` finds them;
* checkpoints are written atomically and hold model, optimiser, scaler, epoch, best metric and RNG
  states; ``checkpoint_last.pth`` is the resume point, ``checkpoint_best.pth`` is chosen on ``val``;
* per-epoch metrics go to ``metrics.jsonl`` and ``metrics.csv`` (and to the trackers of ``run.loggers``:
  TensorBoard when installed by default, wandb, MLflow; :mod:`lever_plugins.runners.trackers`);
  LAVIS's ``log.txt`` is kept for familiarity.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from lever_plugins.checkpoints import CheckpointMismatch, load_checked, read_torch_file
from lever_plugins.compat import import_lavis
from lever_plugins.io import atomic_output, write_text_atomic

import_lavis()

from lavis.common.registry import registry  # noqa: E402
from lavis.runners.runner_base import RunnerBase  # noqa: E402

from lever_plugins.runners import distributed as lever_dist  # noqa: E402
from lever_plugins.run_dir import commit_pending_recipe  # noqa: E402
from lever_plugins.runners.summary import run_summary  # noqa: E402

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "checkpoint_last.pth"
BEST_CHECKPOINT = "checkpoint_best.pth"


def atomic_torch_save(obj: Any, path: str) -> None:
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def _rng_state() -> dict:
    """RNG states in types ``torch.load(weights_only=True)`` accepts (no numpy objects)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



def optimizer_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The AdamW parameter groups of ``model``: its own ``param_groups_for_optimizer(weight_decay)`` if it
    has one (groups may carry ``lr_scale``), else LAVIS's rule (no decay on biases, norms and other 1-d
    weights). Frozen parameters (``requires_grad=False``) are in no group."""
    if hasattr(model, "param_groups_for_optimizer"):
        return model.param_groups_for_optimizer(weight_decay)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name or "norm" in name.lower():
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def trainable_state_dict(model: torch.nn.Module) -> dict:
    """What a run checkpoint keeps of ``model``: every entry of its state dict but the frozen parameters
    (they come from ``pretrained`` again when the model is built)."""
    frozen = {k for k, v in model.named_parameters() if not v.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_run_weights(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Load a :func:`trainable_state_dict` into ``model``: every weight of this model and no other, except
    the frozen ones (a :class:`CheckpointMismatch` otherwise)."""
    frozen = tuple(name for name, param in model.named_parameters() if not param.requires_grad)
    load_checked(model, state_dict, source, allowed_missing=frozen, refuse_unexpected=True)

class LeverRunner(RunnerBase):
    """Registered as ``lever_runner``; selected by ``run.runner`` in a recipe."""

    def __init__(self, cfg, task, model, datasets, job_id):
        super().__init__(cfg, task, model, datasets, job_id)
        self.best_agg_metric: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.global_step = 0

    # ------------------------------------------------------------------------------ set-up
    @property
    def run_cfg(self):
        """The ``run:`` block with every :class:`~lever_plugins.schemas.run.RunSettings` key: our CLI runs the
        resolved recipe, and ``LeverTask.setup_task`` fills the defaults into a recipe that LAVIS's own
        train.py runs, so keys are read directly (no second copy of the defaults here)."""
        return self.config.run_cfg

    @property
    def device(self) -> torch.device:
        if self._device is None:
            requested = self.run_cfg.device
            if requested == "auto":
                requested = "cuda" if torch.cuda.is_available() else "cpu"
            if requested == "cuda" and lever_dist.is_initialized():
                requested = f"cuda:{lever_dist.local_rank()}"
            self._device = torch.device(requested)
        return self._device

    @property
    def use_distributed(self) -> bool:
        return lever_dist.is_initialized() and lever_dist.world_size() > 1

    @property
    def model(self):
        if self._wrapped_model is None:
            self._model = self._model.to(self.device)
            if self.use_distributed:
                device_ids = [self.device.index] if self.device.type == "cuda" else None
                self._wrapped_model = DDP(
                    self._model, device_ids=device_ids,
                    find_unused_parameters=bool(self.run_cfg.find_unused_parameters),
                )
            else:
                self._wrapped_model = self._model
        return self._wrapped_model

    def setup_output_dir(self):
        output_dir = os.path.abspath(os.path.expanduser(self.run_cfg.output_dir))
        result_dir = os.path.join(output_dir, "result")
        os.makedirs(result_dir, exist_ok=True)
        registry.mapping["paths"]["result_dir"] = result_dir
        registry.mapping["paths"]["output_dir"] = output_dir
        self.output_dir = Path(output_dir)
        self.result_dir = Path(result_dir)

    @property
    def optimizer(self):
        if self._optimizer is None:
            groups = optimizer_param_groups(self.unwrap_dist_model(self.model), float(self.run_cfg.weight_decay))
            self._optimizer = torch.optim.AdamW(
                groups,
                lr=float(self.run_cfg.init_lr),
                betas=(float(self.run_cfg.beta1), float(self.run_cfg.beta2)),
                eps=float(self.run_cfg.adam_eps),
            )
            logger.info("trainable parameters: %d", sum(p.numel() for g in groups for p in g["params"]))
        return self._optimizer

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        amp = self.run_cfg.amp
        if amp is False:
            return None
        if amp is True:
            return torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    @property
    def scaler(self):
        if self._scaler is None and self.amp_dtype == torch.float16 and self.device.type == "cuda":
            self._scaler = torch.amp.GradScaler("cuda")
        return self._scaler

    @property
    def lr_scheduler(self):
        if self._lr_sched is None:
            name = self.run_cfg.lr_sched
            scheduler_cls = registry.get_lr_scheduler_class(name)
            self._lr_sched = scheduler_cls(
                optimizer=self.optimizer,
                max_epoch=self.max_epoch,
                min_lr=float(self.run_cfg.min_lr),
                init_lr=float(self.run_cfg.init_lr),
                decay_rate=float(self.run_cfg.lr_decay_rate),
                warmup_start_lr=float(self.run_cfg.warmup_lr),
                warmup_steps=int(self.run_cfg.warmup_steps),
                iters_per_epoch=len(self.train_loader),
                milestones=list(self.run_cfg.lr_milestones),
                gamma=float(self.run_cfg.lr_gamma),
                # lever_onecycle_lr (torch's OneCycleLR over optimiser steps); LAVIS's schedules ignore these
                accum_grad_iters=self.accum_grad_iters,
                pct_start=float(self.run_cfg.onecycle_pct_start),
                div_factor=float(self.run_cfg.onecycle_div_factor),
                final_div_factor=float(self.run_cfg.onecycle_final_div_factor),
                horizon_epochs=self.run_cfg.lr_horizon_epochs,
                cycle_momentum=bool(self.run_cfg.onecycle_cycle_momentum),
                base_momentum=float(self.run_cfg.onecycle_base_momentum),
                max_momentum=float(self.run_cfg.onecycle_max_momentum),
            )
        return self._lr_sched

    @property
    def dataloaders(self) -> dict:
        if self._dataloaders is None:
            by_split: dict[str, Any] = {}
            for dataset_name, splits in self.datasets.items():
                for split_name, dataset in splits.items():
                    if split_name in by_split:
                        raise ValueError(f"split {split_name!r} is provided by two datasets; use one dataset per recipe")
                    by_split[split_name] = dataset
            loaders = {}
            for split_name, dataset in by_split.items():
                is_train = split_name in self.train_splits
                loaders[split_name] = self._make_loader(dataset, is_train)
            self._dataloaders = loaders
        return self._dataloaders

    def _make_loader(self, dataset, is_train: bool) -> DataLoader:
        batch_size = int(self.run_cfg.batch_size_train if is_train else self.run_cfg.batch_size_eval)
        sampler = None
        generator = None
        if is_train:
            seed = int(self.run_cfg.seed)
            if self.use_distributed:
                sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
            else:
                generator = torch.Generator()
                generator.manual_seed(seed)
        collate = getattr(dataset, "collater", None)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=int(self.run_cfg.num_workers),
            pin_memory=self.device.type == "cuda",
            sampler=sampler,
            shuffle=is_train and sampler is None,
            generator=generator,
            collate_fn=collate,
            drop_last=is_train,
        )
        if is_train and len(loader) == 0:
            raise ValueError(
                f"training split has {len(dataset)} samples, fewer than run.batch_size_train={batch_size}"
            )
        return loader

    def set_epoch(self, epoch: int) -> None:
        """Make epoch ``epoch``'s shuffle a function of (seed, epoch) only, for exact resumption."""
        loader = self.train_loader
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        elif loader.generator is not None:
            loader.generator.manual_seed(int(self.run_cfg.seed) * 1000 + epoch)

    # ------------------------------------------------------------------------------ loop
    def train(self):
        try:
            self._train()
        except BaseException as exc:
            self._finish_trackers("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        self._finish_trackers("FINISHED")

    def _train(self):
        # From the task's set-up: LAVIS builds datasets (our ICL pipeline embeds and beam-searches there)
        # and the model before the runner exists, and that time belongs to the run.
        start_time = getattr(self.task, "started_at", None) or time.time()
        self.log_config()
        if self.run_cfg.resume:
            self._resume_from_last()
        elif self.resume_ckpt_path:
            self._load_checkpoint(self.resume_ckpt_path)

        last_epoch = self.start_epoch - 1
        for epoch in range(self.start_epoch, self.max_epoch):
            if self.evaluate_only:
                break
            self.set_epoch(epoch)
            train_stats = self.train_epoch(epoch)
            record = {"epoch": epoch, "split": "train", **train_stats}
            self._log_metrics(record)
            for split_name in self.valid_splits:
                val_log = self.eval_epoch(split_name=split_name, cur_epoch=epoch, skip_reload=True)
                if val_log is None:
                    continue
                agg = float(val_log["agg_metrics"])
                if split_name == "val" and (self.best_agg_metric is None or agg > self.best_agg_metric):
                    self.best_agg_metric, self.best_epoch = agg, epoch
                    self._save_checkpoint(epoch, is_best=True)
                self._log_metrics({"epoch": epoch, "split": split_name, **val_log, "best_epoch": self.best_epoch})
            self._save_checkpoint(epoch, is_best=False)
            last_epoch = epoch
            lever_dist.barrier()

        if self.evaluate_only:
            for split_name in self.valid_splits:
                val_log = self.eval_epoch(split_name=split_name, cur_epoch="evaluate", skip_reload=True)
                if val_log is not None:
                    self._log_metrics({"epoch": "evaluate", "split": split_name, **val_log})
        if self.test_splits:
            have_best = os.path.isfile(os.path.join(self.output_dir, BEST_CHECKPOINT))
            test_epoch = "best" if have_best and not self.evaluate_only else last_epoch
            for split_name in self.test_splits:
                test_log = self.eval_epoch(split_name=split_name, cur_epoch=test_epoch, skip_reload=test_epoch != "best")
                if test_log is not None:
                    self._log_metrics({"epoch": test_epoch, "split": split_name, **test_log})
        if hasattr(self.task, "after_training_all_ranks"):
            self.task.after_training_all_ranks(self)  # every rank: work shared by them (a sharded evaluation)
        if lever_dist.is_main_process() and hasattr(self.task, "after_training"):
            self.task.after_training(self)
        if lever_dist.is_main_process():
            valid = "val" if "val" in self.valid_splits else (self.valid_splits[0] if self.valid_splits else "val")
            logger.info("%s", run_summary(self._read_metric_records(), str(self.output_dir), time.time() - start_time,
                                          valid_split=valid, test_splits=list(self.test_splits)))

    def train_epoch(self, epoch):
        self.model.train()
        return self.task.train_epoch(
            epoch=epoch,
            model=self.model,
            data_loader=self.train_loader,
            optimizer=self.optimizer,
            scaler=self.scaler,
            lr_scheduler=self.lr_scheduler,
            cuda_enabled=self.device.type == "cuda",
            log_freq=self.log_freq,
            accum_grad_iters=self.accum_grad_iters,
            runner=self,
        )

    @torch.no_grad()
    def eval_epoch(self, split_name, cur_epoch, skip_reload=False):
        data_loader = self.dataloaders.get(split_name)
        if data_loader is None:
            raise ValueError(f"no dataset provides split {split_name!r} (have: {', '.join(self.dataloaders)})")
        model = self.unwrap_dist_model(self.model)
        if not skip_reload and cur_epoch == "best":
            model = self._reload_best_model(model)
        model.eval()
        self.task.before_evaluation(model=model, dataset=data_loader.dataset)
        results = self.task.evaluation(model, data_loader, cuda_enabled=self.device.type == "cuda")
        if results is None:
            return None
        return self.task.after_evaluation(val_result=results, split_name=split_name, epoch=cur_epoch)

    def unwrap_dist_model(self, model):
        return model.module if isinstance(model, DDP) else model

    # ------------------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, cur_epoch, is_best=False):
        if not lever_dist.is_main_process():
            return
        from omegaconf import OmegaConf

        payload = {
            "model": trainable_state_dict(self.unwrap_dist_model(self.model)),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "config": OmegaConf.to_container(self.config.config, resolve=True),
            "epoch": cur_epoch,
            "global_step": self.global_step,
            "best_agg_metric": self.best_agg_metric,
            "best_epoch": self.best_epoch,
            "rng": _rng_state(),
        }
        name = BEST_CHECKPOINT if is_best else LAST_CHECKPOINT
        atomic_torch_save(payload, os.path.join(self.output_dir, name))
        logger.info("saved %s (epoch %s)", name, cur_epoch)

    @staticmethod
    def _read_checkpoint(model, path: str) -> dict:
        """A runner checkpoint, its weights loaded into ``model`` by :func:`load_run_weights`."""
        checkpoint = read_torch_file(path)
        if not isinstance(checkpoint.get("model"), dict):
            raise CheckpointMismatch(f"{path}: not a lever_runner checkpoint (no 'model' state dict)")
        load_run_weights(model, checkpoint["model"], path)
        return checkpoint

    def best_model(self):
        """The model in memory (unwrapped) with ``checkpoint_best.pth``'s weights, loaded strictly."""
        return self._reload_best_model(self.unwrap_dist_model(self.model))

    def _reload_best_model(self, model):
        self._read_checkpoint(model, os.path.join(self.output_dir, BEST_CHECKPOINT))
        return model

    def _load_checkpoint(self, path, restore_rng: bool = False):
        checkpoint = self._read_checkpoint(self.unwrap_dist_model(self.model), path)
        if checkpoint.get("optimizer") is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        epoch = checkpoint.get("epoch", -1)
        self.start_epoch = (epoch + 1) if isinstance(epoch, int) else 0
        self.global_step = int(checkpoint.get("global_step", 0))
        self.best_agg_metric = checkpoint.get("best_agg_metric")
        self.best_epoch = checkpoint.get("best_epoch")
        if restore_rng and checkpoint.get("rng"):
            _set_rng_state(checkpoint["rng"])
        logger.info("resumed from %s at epoch %d", path, self.start_epoch)

    def _resume_from_last(self) -> None:
        path = os.path.join(self.output_dir, LAST_CHECKPOINT)
        if not os.path.isfile(path):
            logger.info("no %s in %s: starting from scratch", LAST_CHECKPOINT, self.output_dir)
            if lever_dist.is_main_process():
                commit_pending_recipe(str(self.output_dir))
            return
        self._load_checkpoint(path, restore_rng=True)
        # the checkpoint fits the model the (possibly changed) recipe built: only now may the run's files change
        if lever_dist.is_main_process():
            commit_pending_recipe(str(self.output_dir))
        self._truncate_metrics(self.start_epoch)

    # ------------------------------------------------------------------------------ logging
    def _metrics_path(self, suffix: str) -> str:
        return os.path.join(self.output_dir, f"metrics.{suffix}")

    def _read_metric_records(self) -> list[dict]:
        path = self._metrics_path("jsonl")
        if not os.path.isfile(path):
            return []
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def _write_metric_records(self, records: list[dict]) -> None:
        for suffix, writer in (("jsonl", _write_jsonl), ("csv", _write_csv)):
            with atomic_output(self._metrics_path(suffix)) as tmp:
                writer(tmp, records)

    def _truncate_metrics(self, start_epoch: int) -> None:
        """Drop records of epochs that will be re-run, so a resumed log has no duplicates."""
        if not lever_dist.is_main_process():
            return
        records = [r for r in self._read_metric_records() if isinstance(r.get("epoch"), int) and r["epoch"] < start_epoch]
        self._write_metric_records(records)

    def _log_metrics(self, record: dict) -> None:
        if not lever_dist.is_main_process():
            return
        record = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v) for k, v in record.items()}
        records = self._read_metric_records()
        records.append(record)
        self._write_metric_records(records)
        with open(os.path.join(self.output_dir, "log.txt"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps({f"{record['split']}_{k}": v for k, v in record.items() if k != "split"}) + "\n")
        self._trackers_for_run().log(record)  # tensorboard / wandb / mlflow (run.loggers)
        shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        logger.info("%s", shown)

    def _trackers_for_run(self):
        """The trackers of ``run.loggers`` (main process only), started with the resolved recipe as config."""
        trackers = getattr(self, "_trackers", None)
        if trackers is None:
            import yaml

            from lever_plugins.run_dir import PENDING_RECIPE_FILE, RECIPE_FILE
            from lever_plugins.runners.trackers import start_trackers

            recipe: dict = {}
            for name in (PENDING_RECIPE_FILE, RECIPE_FILE):  # a resumed run's new recipe waits as pending
                path = os.path.join(self.output_dir, name)
                if os.path.isfile(path):
                    with open(path, encoding="utf-8") as handle:
                        recipe = yaml.safe_load(handle) or {}
                    break
            trackers = self._trackers = start_trackers(str(self.output_dir), recipe, self.run_cfg,
                                                       resume=bool(self.run_cfg.resume))
        return trackers

    def _finish_trackers(self, status: str) -> None:
        trackers = getattr(self, "_trackers", None)
        if trackers is not None:
            trackers.finish(status)

    def log_config(self):
        if not lever_dist.is_main_process():
            return
        from omegaconf import OmegaConf

        recipe_path = os.path.join(self.output_dir, "recipe.yaml")
        if not os.path.isfile(recipe_path):
            # Started by LAVIS's own train.py rather than our CLI: keep the recipe beside the outputs.
            import yaml

            plain = OmegaConf.to_container(self.config.config, resolve=True)
            recipe = {key: plain[key] for key in ("model", "datasets", "run") if key in plain}
            write_text_atomic(recipe_path, yaml.safe_dump(recipe, sort_keys=False))

        with open(os.path.join(self.output_dir, "log.txt"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(OmegaConf.to_container(self.config.config, resolve=True), indent=4) + "\n")
        self._trackers_for_run()  # start wandb / mlflow now: the run and its config appear before epoch 1


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def _write_csv(path: str, records: list[dict]) -> None:
    columns: list[str] = []
    for record in records:
        columns.extend(k for k in record if k not in columns)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
