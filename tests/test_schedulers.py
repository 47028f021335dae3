"""Learning-rate schedules: lever_onecycle_lr is torch's OneCycleLR step for step (SPRC's CIRR and FashionIQ
settings, gradient accumulation, a horizon past max_epoch, lr_scale), and each schedule key is honoured or rejected."""
from __future__ import annotations

import inspect
import math
import os
import typing
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lever_plugins.recipes import load_recipe
from lever_plugins.runners.schedulers import MultiStepLRScheduler, OneCycleLRScheduler
from lever_plugins.schema import from_mapping
from lever_plugins.schemas.cir import ComposedRetrievalRunSettings
from lever_plugins.schemas.run import SCHEDULE_KEY_UNION, SCHEDULE_KEYS, RunSettings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SPRC src/blip_fine_tune_2.py: clip_finetune_cirr builds
#   OneCycleLR(optimizer, max_lr=learning_rate, pct_start=1/50, steps_per_epoch=len(loader), epochs=80)
# and trains num_epochs (50 in the paper); clip_finetune_fiq builds
#   OneCycleLR(optimizer, max_lr=learning_rate, pct_start=1.5/num_epochs, div_factor=100., steps_per_epoch=len(loader), epochs=num_epochs)
SPRC_CIRR = dict(pct_start=1 / 50, div_factor=25.0, final_div_factor=1e4, horizon_epochs=80, max_epoch=50)
FIQ_EPOCHS = 10
SPRC_FIQ = dict(pct_start=1.5 / FIQ_EPOCHS, div_factor=100.0, final_div_factor=1e4, horizon_epochs=None, max_epoch=FIQ_EPOCHS)


def _torch_sequence(max_lr, steps, *, pct_start, div_factor, final_div_factor, epochs, steps_per_epoch, momentum):
    """(lr, beta1) of each of the first ``steps`` optimiser steps under torch's OneCycleLR, stepped as SPRC does."""
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=max_lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, pct_start=pct_start, div_factor=div_factor, final_div_factor=final_div_factor,
        steps_per_epoch=steps_per_epoch, epochs=epochs, cycle_momentum=momentum,
    )
    out = []
    for _ in range(steps):
        group = optimizer.param_groups[0]
        out.append((group["lr"], group["betas"][0]))
        optimizer.step()
        scheduler.step()
    return out


def _ours_sequence(max_lr, iters_per_epoch, accum, *, max_epoch, momentum, **schedule):
    """(lr, beta1, lr of an lr_scale 0.1 group) at each optimiser step, driven as LeverTask.train_epoch drives it."""
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "lr_scale": 0.1}],
                                  lr=max_lr, betas=(0.9, 0.98))
    scheduler = OneCycleLRScheduler(optimizer, max_epoch=max_epoch, init_lr=max_lr, iters_per_epoch=iters_per_epoch,
                                    accum_grad_iters=accum, cycle_momentum=momentum, **schedule)
    out = []
    for epoch in range(max_epoch):
        for step in range(iters_per_epoch):
            scheduler.step(cur_epoch=epoch, cur_step=step)
            if (step + 1) % accum == 0 or step + 1 == iters_per_epoch:  # base.py's optimiser-step rule
                full, scaled = optimizer.param_groups
                out.append((full["lr"], full["betas"][0], scaled["lr"]))
    return out


@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("setting", ["cirr", "fiq"])
def test_one_cycle_equals_torch_one_cycle_at_every_optimizer_step(setting, accum, momentum):
    schedule = dict(SPRC_CIRR if setting == "cirr" else SPRC_FIQ)
    max_epoch, horizon = schedule.pop("max_epoch"), schedule["horizon_epochs"]
    iters_per_epoch, max_lr = 7, 1e-5
    ours = _ours_sequence(max_lr, iters_per_epoch, accum, max_epoch=max_epoch, momentum=momentum, **schedule)
    steps_per_epoch = math.ceil(iters_per_epoch / accum)  # an epoch's last partial accumulation steps too
    assert len(ours) == max_epoch * steps_per_epoch
    theirs = _torch_sequence(
        max_lr, len(ours), pct_start=schedule["pct_start"], div_factor=schedule["div_factor"],
        final_div_factor=schedule["final_div_factor"], epochs=horizon or max_epoch, steps_per_epoch=steps_per_epoch,
        momentum=momentum,
    )
    assert [lr for lr, _, _ in ours] == pytest.approx([lr for lr, _ in theirs], rel=1e-12, abs=0)
    assert [lr for _, _, lr in ours] == pytest.approx([lr * 0.1 for lr, _ in theirs], rel=1e-12, abs=0)
    if momentum:
        assert [m for _, m, _ in ours] == pytest.approx([m for _, m in theirs], rel=1e-12, abs=0)
    else:
        assert {m for _, m, _ in ours} == {0.9}  # beta1 left as the optimiser was built
    assert ours[0][0] == pytest.approx(max_lr / schedule["div_factor"])  # the first step uses max_lr / div_factor
    if horizon and horizon > max_epoch:  # SPRC's CIRR: training stops part-way down the curve (80 vs 50 epochs)
        assert ours[-1][0] > 0.1 * max_lr
    else:
        assert ours[-1][0] == pytest.approx(max_lr / schedule["div_factor"] / schedule["final_div_factor"])


def test_one_cycle_whole_horizon_reaches_torch_final_lr():
    ours = _ours_sequence(1e-5, 5, 1, max_epoch=80, momentum=False, pct_start=1 / 50, div_factor=25.0,
                          final_div_factor=1e4, horizon_epochs=80)
    theirs = _torch_sequence(1e-5, 400, pct_start=1 / 50, div_factor=25.0, final_div_factor=1e4, epochs=80,
                             steps_per_epoch=5, momentum=False)
    assert [lr for lr, _, _ in ours] == pytest.approx([lr for lr, _ in theirs], rel=1e-12, abs=0)


def test_one_cycle_schedule_shape():
    # moved from test_training_loop.py; the peak is at torch's phase boundary pct_start * total_steps - 1 = 29
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = OneCycleLRScheduler(optimizer, max_epoch=2, init_lr=1.0, iters_per_epoch=50)
    lrs = [schedule.lr_at(step) for step in range(100)]
    assert lrs[0] == pytest.approx(1.0 / 25)
    assert max(lrs) == pytest.approx(1.0, rel=1e-3) and lrs.index(max(lrs)) == 29
    assert lrs[-1] < 1e-3 and all(a >= b for a, b in zip(lrs[30:], lrs[31:]))


def test_one_cycle_degenerate_warmup_and_horizon_checks():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    # pct_start * total_steps == 1: torch divides by zero at step 0; ours is at the (zero-length) warm-up's end
    schedule = OneCycleLRScheduler(optimizer, max_epoch=1, init_lr=1.0, iters_per_epoch=10, pct_start=0.1)
    assert schedule.lr_at(0) == 1.0 and schedule.lr_at(9) == pytest.approx(1.0 / 25 / 1e4)
    with pytest.raises(ValueError, match="past the schedule's 10 steps"):
        schedule.lr_at(11)
    with pytest.raises(ValueError, match="horizon_epochs=2 < max_epoch=3"):
        OneCycleLRScheduler(optimizer, max_epoch=3, init_lr=1.0, iters_per_epoch=10, horizon_epochs=2)
    with pytest.raises(ValueError, match="momentum or betas"):
        OneCycleLRScheduler(torch.optim.Rprop([nn.Parameter(torch.zeros(1))]), max_epoch=1, init_lr=1.0,
                            iters_per_epoch=1, cycle_momentum=True)


@pytest.mark.lavis
def test_training_loop_steps_one_cycle_once_per_optimizer_step():
    """LeverTask.train_epoch with accum_grad_iters 2: each optimiser step runs at torch's lr for that step."""
    from lever_plugins.compat import import_lavis

    import_lavis()
    from lever_plugins.tasks.base import LeverTask

    model = nn.Linear(4, 1)

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, samples):
            return {"loss": (self.inner(samples["x"]) ** 2).mean()}

    wrapped = Wrapped()
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-3, betas=(0.9, 0.98))
    seen = []
    step = optimizer.step

    def recording_step(*args, **kwargs):
        seen.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0]))
        return step(*args, **kwargs)

    optimizer.step = recording_step
    loader = [{"x": torch.randn(2, 4)} for _ in range(5)]  # 5 batches, accum 2: 3 optimiser steps per epoch
    scheduler = OneCycleLRScheduler(optimizer, max_epoch=3, init_lr=1e-3, iters_per_epoch=len(loader),
                                    accum_grad_iters=2, pct_start=0.3, horizon_epochs=4, cycle_momentum=True)
    task = LeverTask(RunSettings(task="t", output_dir="/tmp/x", progress_bar=False, accum_grad_iters=2))
    runner = SimpleNamespace(amp_dtype=None, output_dir="/tmp/none", global_step=0)
    for epoch in range(3):
        task.train_epoch(epoch=epoch, model=wrapped, data_loader=loader, optimizer=optimizer, lr_scheduler=scheduler,
                         accum_grad_iters=2, runner=runner)
    theirs = _torch_sequence(1e-3, 9, pct_start=0.3, div_factor=25.0, final_div_factor=1e4, epochs=4,
                             steps_per_epoch=3, momentum=True)
    assert runner.global_step == len(seen) == 9
    assert [v for pair in seen for v in pair] == pytest.approx([v for pair in theirs for v in pair], rel=1e-12, abs=0)


@pytest.mark.lavis
def test_runner_builds_one_cycle_from_the_recipe_keys():
    """lever_runner passes every one-cycle key of the resolved CIRR recipe (SPRC's values) to the schedule."""
    from omegaconf import OmegaConf

    from lever_plugins.compat import import_lavis

    import_lavis()
    import lever_plugins.registry  # noqa: F401
    from lever_plugins.runners.runner import LeverRunner

    run = load_recipe(os.path.join(REPO, "recipes", "cirr_gated.yaml")).data["run"]
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-5, betas=(0.9, 0.98))
    fake = SimpleNamespace(_lr_sched=None, run_cfg=OmegaConf.create(run), optimizer=optimizer,
                           max_epoch=run["max_epoch"], train_loader=range(7), accum_grad_iters=2)
    schedule = LeverRunner.lr_scheduler.fget(fake)
    assert isinstance(schedule, OneCycleLRScheduler)
    assert (schedule.steps_per_epoch, schedule.horizon_epochs, schedule.total_steps) == (4, 80, 320)
    assert schedule.phase_ends == (0.02 * 320 - 1, 319.0)
    assert (schedule.max_lr, schedule.initial_lr, schedule.min_lr) == (1e-5, 1e-5 / 25, 1e-5 / 25 / 1e4)
    assert (schedule.cycle_momentum, schedule.base_momentum, schedule.max_momentum) == (True, 0.85, 0.95)


def test_multistep_schedule_keeps_group_scales_and_ignores_accumulation():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]], "lr_scale": 0.1}], lr=1.0)
    schedule = MultiStepLRScheduler(optimizer, init_lr=2e-4, milestones=[9, 15], gamma=0.3, accum_grad_iters=4)
    schedule.step(cur_epoch=10, cur_step=0)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-4 * 0.3, 2e-5 * 0.3])


# ---------------------------------------------------------------------------------------- schedule keys
NON_DEFAULT = {
    "init_lr": 1e-4, "min_lr": 1e-6, "warmup_lr": 0.0, "warmup_steps": 5, "lr_decay_rate": 0.9, "lr_milestones": [2],
    "lr_gamma": 0.5, "onecycle_pct_start": 0.1, "onecycle_div_factor": 100.0, "onecycle_final_div_factor": 100.0,
    "lr_horizon_epochs": 5, "onecycle_cycle_momentum": True, "onecycle_base_momentum": 0.8, "onecycle_max_momentum": 0.9,
}


def _problems(run: dict, cls=RunSettings) -> list[str]:
    problems: list[str] = []
    from_mapping(cls, {"task": "t", "output_dir": "/tmp/x", "max_epoch": 3, **run}, "run", problems)
    return problems


def _base(schedule: str) -> dict:
    return {"lr_sched": schedule, **({"lr_milestones": [1]} if schedule == "lever_multistep_lr" else {})}


def test_schedule_key_table_covers_the_schema_and_every_schedule():
    assert set(SCHEDULE_KEYS) == set(typing.get_args(typing.get_type_hints(RunSettings)["lr_sched"]))
    fields = set(RunSettings.__dataclass_fields__)
    assert set(SCHEDULE_KEY_UNION) <= fields and set(NON_DEFAULT) == set(SCHEDULE_KEY_UNION)


@pytest.mark.lavis
def test_schedule_key_table_matches_what_each_scheduler_takes():
    """The keys listed per schedule are exactly the arguments its class reads (LAVIS's own included)."""
    from lever_plugins.compat import import_lavis

    import_lavis()
    import lever_plugins.registry  # noqa: F401
    from lavis.common.registry import registry

    # the runner's argument name -> the run: key it passes (lever_plugins/runners/runner.py, lr_scheduler)
    run_key = {"init_lr": "init_lr", "min_lr": "min_lr", "warmup_start_lr": "warmup_lr", "warmup_steps": "warmup_steps",
               "decay_rate": "lr_decay_rate", "milestones": "lr_milestones", "gamma": "lr_gamma",
               "pct_start": "onecycle_pct_start", "div_factor": "onecycle_div_factor",
               "final_div_factor": "onecycle_final_div_factor", "horizon_epochs": "lr_horizon_epochs",
               "cycle_momentum": "onecycle_cycle_momentum", "base_momentum": "onecycle_base_momentum",
               "max_momentum": "onecycle_max_momentum"}
    not_keys = {"self", "optimizer", "max_epoch", "iters_per_epoch", "accum_grad_iters", "kwargs", "_"}
    for name, keys in SCHEDULE_KEYS.items():
        params = set(inspect.signature(registry.get_lr_scheduler_class(name).__init__).parameters) - not_keys
        assert {run_key[p] for p in params} == set(keys), name


@pytest.mark.parametrize("schedule", sorted(SCHEDULE_KEYS))
def test_a_schedule_key_the_schedule_does_not_read_is_an_error(schedule):
    reads = SCHEDULE_KEYS[schedule]
    for key in SCHEDULE_KEY_UNION:
        if key in reads:
            continue
        problems = _problems({**_base(schedule), key: NON_DEFAULT[key]})
        expected = (f"run.{key}: lr_sched {schedule} does not read this key (it reads {', '.join(reads)}); "
                    "remove it or choose a schedule that reads it")
        assert expected in problems, (key, problems)


@pytest.mark.parametrize("schedule", sorted(SCHEDULE_KEYS))
def test_every_key_a_schedule_reads_is_accepted_and_defaults_are_fine(schedule):
    assert _problems({**_base(schedule), **{k: NON_DEFAULT[k] for k in SCHEDULE_KEYS[schedule]}}) == []
    # a resolved recipe spells every default out: an explicit default is not "set"
    defaults = RunSettings(task="t", output_dir="/tmp/x", **_base(schedule)).to_dict()
    assert _problems(defaults) == []


def test_one_cycle_cross_checks():
    onecycle = {"lr_sched": "lever_onecycle_lr"}
    assert _problems({**onecycle, "lr_horizon_epochs": 2}) == [
        "run.lr_horizon_epochs: 2 < max_epoch 3; the one-cycle schedule ends at its horizon (null: max_epoch)"
    ]
    assert _problems({**onecycle, "lr_horizon_epochs": 3}) == []
    assert _problems({**onecycle, "onecycle_cycle_momentum": True, "beta1": 0.8}) == [
        "run.beta1: lever_onecycle_lr with onecycle_cycle_momentum: true sets beta1 at every step "
        "(onecycle_max_momentum -> onecycle_base_momentum -> back); remove beta1 or set onecycle_cycle_momentum: false"
    ]
    assert _problems({**onecycle, "beta1": 0.8}) == []
    assert _problems({**onecycle, "onecycle_base_momentum": 0.8}) == [
        "run.onecycle_base_momentum: read only with onecycle_cycle_momentum: true"
    ]
    assert _problems({**onecycle, "onecycle_pct_start": 1.5, "onecycle_div_factor": 0}) == [
        "run.onecycle_pct_start: must be <= 1, got 1.5", "run.onecycle_div_factor: must be > 0, got 0.0",
    ]
    with pytest.raises(ValueError, match="warmup_steps: lr_sched lever_onecycle_lr does not read this key"):
        RunSettings(task="t", output_dir="/tmp/x", lr_sched="lever_onecycle_lr", warmup_steps=10, warmup_lr=0.0)


@pytest.mark.parametrize("name", ["cirr_gated.yaml", "cirr_baseline.yaml"])
def test_cirr_recipes_carry_sprc_schedule_and_revalidate_resolved(name):
    run = load_recipe(os.path.join(REPO, "recipes", name)).data["run"]
    assert {k: run[k] for k in SCHEDULE_KEYS["lever_onecycle_lr"]} == {
        "init_lr": 1e-5, "onecycle_pct_start": 1 / 50, "onecycle_div_factor": 25.0, "onecycle_final_div_factor": 1e4,
        "lr_horizon_epochs": 80, "onecycle_cycle_momentum": True, "onecycle_base_momentum": 0.85,
        "onecycle_max_momentum": 0.95,
    }
    assert (run["lr_sched"], run["max_epoch"], run["beta2"]) == ("lever_onecycle_lr", 50, 0.98)
    problems: list[str] = []
    from_mapping(ComposedRetrievalRunSettings, run, "run", problems)  # what setup_task does at run time
    assert problems == []


@pytest.mark.parametrize(
    "recipe",
    sorted(os.path.relpath(os.path.join(d, f), REPO) for d, _, fs in os.walk(os.path.join(REPO, "recipes"))
           for f in fs if f.endswith(".yaml")),
)
def test_shipped_recipes_validate_with_only_missing_local_files(recipe):
    from click.testing import CliRunner

    from lever_plugins.cli import main

    result = CliRunner().invoke(main, ["validate", os.path.join(REPO, recipe)])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert all(": file not found: " in line or ": directory not found: " in line for line in errors), errors
    assert (result.exit_code == 0) == (not errors), result.output
