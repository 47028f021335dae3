"""The shared training loop: accumulation equals a bigger batch, clipping, bf16 autocast on CPU, schedules."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lever_plugins.compat import import_lavis

import_lavis()
pytestmark = pytest.mark.lavis

from lever_plugins.runners.schedulers import MultiStepLRScheduler  # noqa: E402
from lever_plugins.schemas.run import RunSettings  # noqa: E402
from lever_plugins.tasks.base import LeverTask, NonFiniteLoss  # noqa: E402


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, samples):
        loss = ((self.linear(samples["x"]).squeeze(-1) - samples["y"]) ** 2).mean()
        return {"loss": loss, "loss_mse": loss.detach()}


class ConstantLR:
    def step(self, cur_epoch, cur_step):
        pass


def _data(n):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    return [{"x": x[i : i + 1], "y": x[i : i + 1].sum(-1)} for i in range(n)]


def _batches(rows, size):
    return [{"x": torch.cat([r["x"] for r in rows[i : i + size]]), "y": torch.cat([r["y"] for r in rows[i : i + size]])}
            for i in range(0, len(rows), size)]


def _task(**run):
    return LeverTask(RunSettings(task="t", output_dir="/tmp/x", progress_bar=False, **run))


def _train(task, model, loader, accum=1, runner=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return task.train_epoch(epoch=0, model=model, data_loader=loader, optimizer=optimizer, lr_scheduler=ConstantLR(),
                            accum_grad_iters=accum, runner=runner)


def test_accumulating_two_half_batches_equals_one_full_batch():
    rows = _data(16)
    torch.manual_seed(0)
    full, accumulated = Regression(), Regression()
    accumulated.load_state_dict(full.state_dict())
    _train(_task(), full, _batches(rows, 8))
    stats = _train(_task(), accumulated, _batches(rows, 4), accum=2)
    for a, b in zip(full.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b)
    assert set(stats) == {"loss", "loss_mse", "lr"}


def test_gradient_clipping_bounds_the_update():
    rows = [{"x": torch.full((1, 4), 100.0), "y": torch.zeros(1)}]
    torch.manual_seed(0)
    model = Regression()
    before = [p.detach().clone() for p in model.parameters()]
    _train(_task(max_grad_norm=1.0), model, _batches(rows, 1))
    step = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert step.item() == pytest.approx(0.1, rel=1e-4)  # lr x clipped norm


def test_bf16_autocast_on_cpu_trains():
    rows = _data(8)
    model = Regression()
    runner = SimpleNamespace(amp_dtype=torch.bfloat16, output_dir="/tmp/none", global_step=0)
    stats = _train(_task(amp="bf16"), model, _batches(rows, 4), runner=runner)
    assert math.isfinite(stats["loss"]) and runner.global_step == 2


def test_non_finite_loss_raises_with_position():
    rows = [{"x": torch.full((1, 4), float("nan")), "y": torch.zeros(1)}]
    with pytest.raises(NonFiniteLoss, match="at epoch 0 step 0"):
        _train(_task(), Regression(), _batches(rows, 1))


def test_multistep_schedule_keeps_group_scales():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]], "lr_scale": 0.1}], lr=1.0)
    schedule = MultiStepLRScheduler(optimizer, init_lr=2e-4, milestones=[9, 15], gamma=0.3)
    schedule.step(cur_epoch=10, cur_step=0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4 * 0.3)
    assert optimizer.param_groups[1]["lr"] == pytest.approx(2e-5 * 0.3)
    schedule.step(cur_epoch=15, cur_step=0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4 * 0.09)


@pytest.mark.parametrize("name", ["linear_warmup_cosine_lr", "linear_warmup_step_lr", "lever_onecycle_lr", "lever_multistep_lr"])
def test_every_schedule_a_recipe_accepts_exists_and_steps(name):
    """Each lr_sched value the schema allows resolves in LAVIS's registry and gives a positive lr at default settings."""
    import typing

    import lever_plugins.registry  # noqa: F401
    from lavis.common.registry import registry

    allowed = typing.get_args(typing.get_type_hints(RunSettings)["lr_sched"])
    assert name in allowed and len(allowed) == 4
    settings = RunSettings(task="t", output_dir="/tmp/x", lr_sched=name, init_lr=1e-3, max_epoch=3,
                           lr_milestones=[1] if name == "lever_multistep_lr" else [])
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = registry.get_lr_scheduler_class(name)(
        optimizer=optimizer, max_epoch=settings.max_epoch, min_lr=settings.min_lr, init_lr=settings.init_lr,
        decay_rate=settings.lr_decay_rate, warmup_start_lr=settings.warmup_lr, warmup_steps=settings.warmup_steps,
        iters_per_epoch=4, milestones=settings.lr_milestones, gamma=settings.lr_gamma,
    )
    for epoch in range(3):
        for step in range(4):
            schedule.step(cur_epoch=epoch, cur_step=step)
            assert 0 < optimizer.param_groups[0]["lr"] <= 1e-3 + 1e-12


def test_runner_checkpoint_must_match_the_model_except_its_frozen_weights(tmp_path):
    """A resumed / best checkpoint holds exactly the trainable weights (the runner does not save frozen ones)."""
    from lever_plugins.checkpoints import CheckpointMismatch
    from lever_plugins.runners.runner import LeverRunner

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    model[0].requires_grad_(False)
    saved = {"1.weight": torch.full((1, 4), 0.5), "1.bias": torch.full((1,), 2.0)}  # no frozen "0." weights
    path = tmp_path / "checkpoint_last.pth"
    torch.save({"model": saved, "epoch": 3}, path)
    assert LeverRunner._read_checkpoint(model, str(path))["epoch"] == 3
    assert torch.equal(model[1].bias, saved["1.bias"]) and torch.equal(model[1].weight, saved["1.weight"])

    torch.save({"model": {"1.weight": saved["1.weight"]}}, path)
    with pytest.raises(CheckpointMismatch, match=r"1 weights missing from the checkpoint: 1\.bias$"):
        LeverRunner._read_checkpoint(model, str(path))
    torch.save({"model": {**saved, "2.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointMismatch, match=r"checkpoint weights this model does not have .*: 2\.weight$"):
        LeverRunner._read_checkpoint(model, str(path))
    torch.save(saved, path)
    with pytest.raises(CheckpointMismatch, match=r"not a lever_runner checkpoint \(no 'model' state dict\)"):
        LeverRunner._read_checkpoint(model, str(path))
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointMismatch, match=r"cannot load as a weights-only torch checkpoint"):
        LeverRunner._read_checkpoint(model, str(path))
