"""Common training loop of our LAVIS tasks.

LAVIS 1.0.2's ``BaseTask._train_inner_loop`` logs only the total loss, uses CUDA-only autocast, does
not clip gradients and cannot notice a NaN. Ours keeps LAVIS's task interface (``setup_task``,
``train_epoch``, ``evaluation``, ``after_evaluation``) and adds: validation of the ``run:`` block
against the task's settings, per-part loss averages, ``torch.autocast`` on CPU and GPU, gradient
accumulation and clipping, a clear stop on a non-finite loss, and a progress bar.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from collections import defaultdict
from typing import Any, Mapping, Optional

import torch

from lever_plugins.compat import import_lavis
from lever_plugins.recipes import to_plain
from lever_plugins.schema import RecipeError, from_mapping
from lever_plugins.schemas.run import RunSettings

import_lavis()

from lavis.tasks.base_task import BaseTask  # noqa: E402

from lever_plugins.runners import distributed as lever_dist  # noqa: E402
from lever_plugins.runners.threads import apply_num_threads  # noqa: E402

# keys the runner or torchrun set at run time; not part of a recipe
RUNTIME_RUN_KEYS = ("gpu", "rank")


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the message names the step and the last good checkpoint."""


def move_to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], torch.Tensor):
        return type(obj)(move_to_device(v, device) for v in obj)
    return obj


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class LeverTask(BaseTask):
    """Base of our tasks; subclasses set ``settings_cls`` (a :class:`RunSettings` subclass)."""

    settings_cls: type = RunSettings

    def __init__(self, settings: Optional[RunSettings] = None):
        super().__init__()
        self.settings = settings if settings is not None else None

    @classmethod
    def setup_task(cls, cfg=None, **kwargs):
        run_block = {}
        if cfg is not None:
            run_block = {k: v for k, v in to_plain(cfg.run_cfg).items() if k not in RUNTIME_RUN_KEYS}
        problems: list[str] = []
        settings = from_mapping(cls.settings_cls, run_block, "run", problems)
        if problems:
            raise RecipeError(problems)
        if cfg is not None:
            # A recipe run by LAVIS's own train.py was not resolved by our CLI: fill in the defaults
            # so the runner reads exactly the values that were validated.
            for key, value in settings.to_dict().items():
                if key not in cfg.run_cfg:
                    cfg.run_cfg[key] = value
        task = cls(settings)
        task.started_at = time.time()  # the runner's summary reports the wall time from here
        # before datasets and model are built: they may already run torch ops
        apply_num_threads(settings.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return task

    # -------------------------------------------------------------------------- hooks
    def on_train_epoch_start(self, model: torch.nn.Module, epoch: int) -> None:
        """Called before each training epoch (e.g. to switch on hard negatives)."""

    def after_training(self, runner) -> None:
        """Called once on the main process after training and testing (e.g. to draw figures)."""

    def check_across_blocks(self, cfg) -> None:
        """The task's catalogue cross-check on LAVIS config ``cfg`` (LAVIS's own train.py never runs
        `lever-plugins validate`), once per config: before the model is built, or earlier by a task whose
        datasets already do long work."""
        if self.settings is None or getattr(self, "_checked_config", None) is cfg:
            return
        from lever_plugins.recipes import cross_block_problems_of_config

        problems = cross_block_problems_of_config(cfg, self.settings.to_dict())
        if problems:
            raise RecipeError(problems)
        self._checked_config = cfg

    def build_model(self, cfg):
        self.check_across_blocks(cfg)  # before a model that may take minutes to load
        model = super().build_model(cfg)
        if hasattr(model, "gather_negatives") and self.settings is not None:
            model.gather_negatives = self.settings.gather_negatives  # run.gather_negatives
        return model

    def autocast(self, device: torch.device, dtype: Optional[torch.dtype]):
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    # -------------------------------------------------------------------------- training
    def train_epoch(
        self,
        epoch,
        model,
        data_loader,
        optimizer,
        lr_scheduler,
        scaler=None,
        cuda_enabled=False,
        log_freq=50,
        accum_grad_iters=1,
        runner=None,
    ):
        device = model_device(model)
        unwrapped = getattr(model, "module", model)
        self.on_train_epoch_start(unwrapped, epoch)
        amp_dtype = getattr(runner, "amp_dtype", None)
        max_grad_norm = self.settings.max_grad_norm if self.settings is not None else None
        show_bar = lever_dist.is_main_process() and (self.settings is None or self.settings.progress_bar)
        num_steps = len(data_loader)
        sums: dict[str, float] = defaultdict(float)
        count = 0
        progress = None
        if show_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=num_steps, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)
        optimizer.zero_grad(set_to_none=True)
        for step, samples in enumerate(data_loader):
            samples = move_to_device(samples, device)
            samples.update({"epoch": epoch, "num_iters_per_epoch": num_steps, "iters": step})
            lr_scheduler.step(cur_epoch=epoch, cur_step=step)
            with self.autocast(device, amp_dtype):
                output = model(samples)
            loss = output["loss"]
            if not torch.isfinite(loss.detach()).all():
                last = os.path.join(str(getattr(runner, "output_dir", "")), "checkpoint_last.pth")
                where = last if runner is not None and os.path.isfile(last) else "none yet"
                raise NonFiniteLoss(
                    f"non-finite loss ({loss.item()}) at epoch {epoch} step {step}; training stopped. "
                    f"Last good checkpoint: {where}"
                )
            scaled = loss / accum_grad_iters
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            if (step + 1) % accum_grad_iters == 0 or step + 1 == num_steps:
                if max_grad_norm is not None:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(
                        [p for group in optimizer.param_groups for p in group["params"]], max_grad_norm
                    )
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if runner is not None:
                    runner.global_step += 1
            for key, value in output.items():
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    sums[key] += float(value.detach())
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    sums[key] += float(value)
            count += 1
            if progress is not None:
                progress.update(1)
                if step % max(1, log_freq // 10) == 0:
                    progress.set_postfix(loss=f"{float(loss.detach()):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if progress is not None:
            progress.close()
        stats = {k: v / max(count, 1) for k, v in sums.items()}
        stats = lever_dist.all_reduce_mean(stats)
        stats["lr"] = float(optimizer.param_groups[0]["lr"])
        if not all(math.isfinite(v) for v in stats.values()):
            raise NonFiniteLoss(f"non-finite epoch statistics at epoch {epoch}: {stats}")
        return stats
