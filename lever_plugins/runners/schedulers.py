"""Learning-rate schedules with LAVIS's scheduler interface (``step(cur_epoch, cur_step)``).

LAVIS ships linear-warmup cosine/step schedules; SPRC trains with torch's one-cycle schedule
and LAPS/SEPS with a multi-step one, so both are provided here (the ``run:`` keys each schedule reads
are listed once, in ``lever_plugins.schemas.run.SCHEDULE_KEYS``). Each parameter group's lr is the
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
    """torch's ``OneCycleLR`` (cosine, two phases) behind LAVIS's ``step(cur_epoch, cur_step)`` interface.

    SPRC builds ``OneCycleLR`` and calls ``scheduler.step()`` after every optimiser step, so optimiser
    step ``k`` (0-based, from the start of training) runs at the lr torch gives after ``k`` calls. Here an
    epoch of ``iters_per_epoch`` batches makes ``ceil(iters_per_epoch / accum_grad_iters)`` optimiser steps
    (the training loop also steps on an epoch's last, partial accumulation), the schedule spans
    ``horizon_epochs`` (default ``max_epoch``) of them, and the batch ``cur_step`` of epoch ``cur_epoch``
    belongs to optimiser step ``cur_epoch * steps_per_epoch + cur_step // accum_grad_iters``. The lr is a
    function of (epoch, step) alone, so a resumed run continues on the same curve.

    As torch: warm up from ``init_lr / div_factor`` to ``init_lr`` at step ``pct_start * total_steps - 1``,
    then anneal to ``init_lr / div_factor / final_div_factor`` at step ``total_steps - 1``, both cosine.
    With ``cycle_momentum`` (torch's default, SPRC's run) the groups' momentum (AdamW's beta1) starts at
    ``max_momentum``, falls to ``base_momentum`` while the lr rises and climbs back while it falls.
    Each group's lr is the schedule's value times its ``lr_scale``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_epoch: int,
        init_lr: float,
        iters_per_epoch: int,
        pct_start: float = 0.3,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        horizon_epochs: Optional[int] = None,
        accum_grad_iters: int = 1,
        cycle_momentum: bool = False,
        base_momentum: float = 0.85,
        max_momentum: float = 0.95,
        **_: object,
    ) -> None:
        self.optimizer = optimizer
        self.accum_grad_iters = max(1, int(accum_grad_iters))
        self.steps_per_epoch = max(1, math.ceil(int(iters_per_epoch) / self.accum_grad_iters))
        self.horizon_epochs = int(max_epoch if horizon_epochs is None else horizon_epochs)
        if self.horizon_epochs < int(max_epoch):
            raise ValueError(
                f"horizon_epochs={self.horizon_epochs} < max_epoch={max_epoch}: the one-cycle schedule ends at its horizon"
            )
        if not 0.0 <= pct_start <= 1.0:
            raise ValueError(f"pct_start must be in [0, 1], got {pct_start}")
        self.total_steps = max(1, self.horizon_epochs * self.steps_per_epoch)
        self.max_lr = float(init_lr)
        self.initial_lr = self.max_lr / div_factor
        self.min_lr = self.initial_lr / final_div_factor
        self.phase_ends = (float(pct_start * self.total_steps) - 1, float(self.total_steps - 1))
        self.cycle_momentum = bool(cycle_momentum)
        self.base_momentum, self.max_momentum = float(base_momentum), float(max_momentum)
        if self.cycle_momentum:
            for group in optimizer.param_groups:
                if "betas" not in group and "momentum" not in group:
                    raise ValueError("cycle_momentum needs an optimiser with momentum or betas (beta1)")

    @staticmethod
    def _cos(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)  # torch's _annealing_cos

    def _phase(self, global_step: int) -> tuple[int, float]:
        """(phase, fraction of it done) at optimiser step ``global_step``, found as torch's ``get_lr``."""
        if global_step > self.total_steps:
            raise ValueError(f"optimiser step {global_step} is past the schedule's {self.total_steps} steps")
        start = 0.0
        for index, end in enumerate(self.phase_ends):
            if global_step <= end or index == len(self.phase_ends) - 1:
                span = end - start
                return index, (global_step - start) / span if span else 1.0  # torch divides by zero here
            start = end
        raise AssertionError("unreachable")

    def lr_at(self, global_step: int) -> float:
        """The lr (before ``lr_scale``) of optimiser step ``global_step`` (0-based)."""
        phase, pct = self._phase(global_step)
        if phase == 0:
            return self._cos(self.initial_lr, self.max_lr, pct)
        return self._cos(self.max_lr, self.min_lr, pct)

    def momentum_at(self, global_step: int) -> float:
        phase, pct = self._phase(global_step)
        if phase == 0:
            return self._cos(self.max_momentum, self.base_momentum, pct)
        return self._cos(self.base_momentum, self.max_momentum, pct)

    def global_step(self, cur_epoch: int, cur_step: int) -> int:
        """The optimiser step that batch ``cur_step`` of epoch ``cur_epoch`` contributes to."""
        return int(cur_epoch) * self.steps_per_epoch + int(cur_step) // self.accum_grad_iters

    def step(self, cur_epoch: int, cur_step: int) -> None:
        global_step = self.global_step(cur_epoch, cur_step)
        _apply(self.optimizer, self.lr_at(global_step))
        if self.cycle_momentum:
            momentum = self.momentum_at(global_step)
            for group in self.optimizer.param_groups:
                if "betas" in group:
                    group["betas"] = (momentum, *group["betas"][1:])
                else:
                    group["momentum"] = momentum


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
