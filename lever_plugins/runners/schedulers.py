"""Learning-rate schedules with LAVIS's scheduler interface (``step(cur_epoch, cur_step)``).

LAVIS ships linear-warmup cosine/step and constant schedules; SPRC trains with a one-cycle schedule
and LAPS/SEPS with a multi-step one, so both are provided here. Each parameter group's lr is the
schedule's value times the group's ``lr_scale`` (default 1), which keeps per-group multipliers such as
"backbone x 0.1" intact (LAVIS's own schedules overwrite every group with one value).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def _apply(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class OneCycleLRScheduler:
    """Cosine one-cycle: warm up from ``init_lr / div_factor`` to ``init_lr`` over ``pct_start`` of all
    steps, then anneal to ``init_lr / (div_factor * final_div_factor)`` (torch's OneCycleLR defaults)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_epoch: int,
        init_lr: float,
        iters_per_epoch: int,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        **_: object,
    ) -> None:
        self.optimizer = optimizer
        self.total_steps = max(1, int(max_epoch) * int(iters_per_epoch))
        self.iters_per_epoch = max(1, int(iters_per_epoch))
        self.max_lr = float(init_lr)
        self.start_lr = self.max_lr / div_factor
        self.end_lr = self.start_lr / final_div_factor
        self.warmup_steps = max(1, int(pct_start * self.total_steps))

    def lr_at(self, global_step: int) -> float:
        if global_step < self.warmup_steps:
            fraction = global_step / self.warmup_steps
            low, high = self.start_lr, self.max_lr
        else:
            fraction = (global_step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            low, high = self.max_lr, self.end_lr
        fraction = min(max(fraction, 0.0), 1.0)
        return high + (low - high) * 0.5 * (1.0 + math.cos(math.pi * fraction))

    def step(self, cur_epoch: int, cur_step: int) -> None:
        _apply(self.optimizer, self.lr_at(cur_epoch * self.iters_per_epoch + cur_step))


class MultiStepLRScheduler:
    """``init_lr * gamma ** (number of milestones <= epoch)``, after an optional linear warm-up."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        init_lr: float,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_steps: int = 0,
        warmup_start_lr: Optional[float] = None,
        **_: object,
    ) -> None:
        self.optimizer = optimizer
        self.init_lr = float(init_lr)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = float(gamma)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_lr = self.init_lr if warmup_start_lr is None or warmup_start_lr < 0 else float(warmup_start_lr)

    def lr_at(self, cur_epoch: int, cur_step: int) -> float:
        if cur_epoch == 0 and cur_step < self.warmup_steps:
            return self.warmup_start_lr + (self.init_lr - self.warmup_start_lr) * cur_step / self.warmup_steps
        return self.init_lr * self.gamma ** sum(1 for m in self.milestones if cur_epoch >= m)

    def step(self, cur_epoch: int, cur_step: int) -> None:
        _apply(self.optimizer, self.lr_at(cur_epoch, cur_step))
