"""Settings of the recipe's ``run:`` block (LAVIS runner keys keep their LAVIS meaning)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Union

from lever_plugins.schema import Settings, setting


# The ``run:`` keys each ``lr_sched`` reads: LAVIS 1.0.2's two (lavis/common/optims.py, built by our runner
# with warmup_lr as warmup_start_lr and lr_decay_rate as decay_rate) and ours (lever_plugins/runners/schedulers.py).
# A schedule key that the chosen schedule does not read is an error when the recipe sets it (not its default).
SCHEDULE_KEYS: dict[str, tuple[str, ...]] = {
    "linear_warmup_cosine_lr": ("init_lr", "min_lr", "warmup_lr", "warmup_steps"),
    "linear_warmup_step_lr": ("init_lr", "min_lr", "warmup_lr", "warmup_steps", "lr_decay_rate"),
    "lever_onecycle_lr": (
        "init_lr", "onecycle_pct_start", "onecycle_div_factor", "onecycle_final_div_factor", "lr_horizon_epochs",
        "onecycle_cycle_momentum", "onecycle_base_momentum", "onecycle_max_momentum",
    ),
    "lever_multistep_lr": ("init_lr", "warmup_lr", "warmup_steps", "lr_milestones", "lr_gamma"),
}
SCHEDULE_KEY_UNION: tuple[str, ...] = tuple(dict.fromkeys(k for keys in SCHEDULE_KEYS.values() for k in keys))
# Schedules that multiply each parameter group's lr by its ``lr_scale`` (LAVIS's give every group one lr).
SCHEDULES_WITH_LR_SCALE = ("lever_multistep_lr", "lever_onecycle_lr")


# ``run.loggers``: each tracker -> (module it needs, pip package that provides it), and the keys only it reads.
# ``csv`` (metrics.csv + metrics.jsonl + log.txt) is always written: --resume and the run summary read it.
LOGGER_PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),  # or the full `mlflow`
}
LOGGER_KEYS: dict[str, tuple[str, ...]] = {
    "wandb": ("wandb_project", "wandb_mode"),
    "mlflow": ("mlflow_tracking_uri", "mlflow_experiment"),
}


def logger_installed(name: str) -> bool:
    """Whether the package tracker ``name`` needs is importable (looked up, not imported)."""
    import importlib.util

    if name not in LOGGER_PACKAGES:
        return True
    try:
        return importlib.util.find_spec(LOGGER_PACKAGES[name][0]) is not None
    except (ImportError, ValueError):
        return False


def resolved_loggers(loggers: Optional[list]) -> list[str]:
    """``run.loggers`` as run: null means csv, plus tensorboard when it is installed (the default)."""
    if loggers is None:
        return ["csv"] + (["tensorboard"] if logger_installed("tensorboard") else [])
    return list(dict.fromkeys(loggers))


def lr_scale_problem(key: str, scale: float, lr_sched: str) -> Optional[str]:
    """The problem with a model's per-group lr multiplier ``key`` under ``lr_sched``, or None."""
    if scale == 1.0 or lr_sched in SCHEDULES_WITH_LR_SCALE:
        return None
    return (f"{key}={scale} needs run.lr_sched {' or '.join(SCHEDULES_WITH_LR_SCALE)} (LAVIS's {lr_sched} gives "
            f"every parameter group the same lr); or set {key}: 1.0")


@dataclass(kw_only=True)
class RunSettings(Settings):
    """Keys of ``run:`` read by LAVIS's runner and ours. Tasks may add keys by subclassing."""

    task: str = setting(help="registered LAVIS task name, e.g. lever_composed_retrieval")
    runner: str = setting("lever_runner", help="registered runner; lever_runner works on CPU, GPU and torchrun")
    output_dir: str = setting(help="where the resolved recipe, logs, metrics and checkpoints go (made absolute)")
    device: Literal["cpu", "cuda", "auto"] = setting("auto", help="cpu, cuda, or auto (cuda when available)")
    num_threads: Union[Literal["auto"], int] = setting(
        "auto", help="torch CPU threads per process: auto (the cores this process may use, shared among the "
        "processes on this machine, less those busy with other work) or a number; the demos use 1, so their "
        "numbers are the same on every machine and a busy machine does not slow them down (the choice is in run.log)"
    )
    seed: int = setting(42, help="random seed (per rank: seed + rank)")

    # optimisation
    lr_sched: Literal[
        "linear_warmup_cosine_lr", "linear_warmup_step_lr", "lever_onecycle_lr", "lever_multistep_lr"
    ] = setting(
        "linear_warmup_cosine_lr",
        help="learning-rate schedule: LAVIS 1.0.2's two, or ours (one-cycle, multi-step); setting a schedule key "
        "the chosen schedule does not read is an error",
    )
    init_lr: float = setting(1e-5, help="peak learning rate", gt=0)
    min_lr: float = setting(0.0, help="final lr of linear_warmup_cosine_lr, lower bound of linear_warmup_step_lr", ge=0)
    warmup_lr: float = setting(-1.0, help="start of the linear warm-up (-1: no warm-up)")
    warmup_steps: int = setting(0, help="linear warm-up steps", ge=0)
    lr_decay_rate: float = setting(1.0, help="per-epoch lr factor of linear_warmup_step_lr", gt=0)
    lr_milestones: list[int] = setting(default_factory=list, help="epochs at which lever_multistep_lr multiplies the lr by lr_gamma")
    lr_gamma: float = setting(0.1, help="lever_multistep_lr decay factor", gt=0)
    onecycle_pct_start: float = setting(
        0.3, help="lever_onecycle_lr: fraction of the schedule's optimiser steps spent warming up (torch's pct_start)", ge=0, le=1
    )
    onecycle_div_factor: float = setting(25.0, help="lever_onecycle_lr: the warm-up starts at init_lr / onecycle_div_factor", gt=0)
    onecycle_final_div_factor: float = setting(
        1e4, help="lever_onecycle_lr: the schedule ends at init_lr / onecycle_div_factor / onecycle_final_div_factor", gt=0
    )
    lr_horizon_epochs: Optional[int] = setting(
        None,
        help="lever_onecycle_lr: epochs the schedule is built over (null: max_epoch); above max_epoch, training "
        "stops part-way down the curve (SPRC's CIRR run: 80 over 50 epochs)",
        ge=1,
    )
    onecycle_cycle_momentum: bool = setting(
        False,
        help="lever_onecycle_lr: move AdamW's beta1 opposite the lr, onecycle_max_momentum -> onecycle_base_momentum "
        "-> back (torch's default, SPRC's run); replaces beta1",
    )
    onecycle_base_momentum: float = setting(0.85, help="lever_onecycle_lr: beta1 at the lr peak (with onecycle_cycle_momentum)", ge=0, lt=1)
    onecycle_max_momentum: float = setting(
        0.95, help="lever_onecycle_lr: beta1 at the start and end (with onecycle_cycle_momentum)", ge=0, lt=1
    )
    weight_decay: float = setting(0.05, help="AdamW weight decay (not applied to biases and norms)", ge=0)
    beta1: float = setting(0.9, help="AdamW beta1", gt=0, lt=1)
    beta2: float = setting(0.999, help="AdamW beta2", gt=0, lt=1)
    adam_eps: float = setting(1e-8, help="AdamW epsilon", gt=0)
    max_grad_norm: Optional[float] = setting(None, help="clip the gradient norm to this value (null: no clipping)", gt=0)
    max_epoch: int = setting(1, help="training epochs", ge=1)
    accum_grad_iters: int = setting(1, help="gradient accumulation steps per optimiser step", ge=1)
    amp: Literal[False, True, "bf16", "fp16"] = setting(
        False, help="mixed precision: false, true (fp16 on cuda, bf16 on cpu), bf16 or fp16"
    )

    # data
    batch_size_train: int = setting(8, help="per-process training batch size", ge=1)
    batch_size_eval: int = setting(32, help="per-process evaluation batch size", ge=1)
    num_workers: int = setting(0, help="DataLoader worker processes", ge=0)
    train_splits: list[str] = setting(default_factory=lambda: ["train"], help="splits to train on")
    valid_splits: list[str] = setting(default_factory=lambda: ["val"], help="splits to validate on (best checkpoint chosen here)")
    test_splits: list[str] = setting(default_factory=list, help="splits evaluated once with the best checkpoint")

    # bookkeeping
    log_freq: int = setting(50, help="log the training loss every N steps", ge=1)
    evaluate: bool = setting(False, help="evaluate only (needs resume_ckpt_path or a checkpoint in output_dir)")
    resume: bool = setting(False, help="continue from the last checkpoint in output_dir")
    resume_ckpt_path: Optional[str] = setting(None, help="checkpoint to start from (weights, optimiser, epoch)", path="file")
    progress_bar: bool = setting(True, help="show tqdm progress bars on the main process")

    # experiment trackers (rank 0 only)
    loggers: Optional[list[Literal["csv", "tensorboard", "wandb", "mlflow"]]] = setting(
        None,
        help="where per-epoch metrics go: csv (metrics.csv + metrics.jsonl + log.txt; always, --resume reads it), "
        "tensorboard (output_dir/tensorboard), wandb, mlflow; each needs its package installed; null: csv, plus "
        "tensorboard if installed. wandb and mlflow get the resolved recipe as the run's config",
    )
    tracker_run_name: Optional[str] = setting(
        None, help="wandb / mlflow run name (null: the name of output_dir); read with loggers wandb or mlflow"
    )
    wandb_project: str = setting("lever-plugins", help="wandb project (loggers: wandb)")
    wandb_mode: Literal["offline", "online"] = setting(
        "offline",
        help="wandb mode (loggers: wandb): offline writes the run under output_dir/wandb, nothing leaves the machine "
        "(upload later with `wandb sync`); online streams to the wandb server (needs `wandb login`)",
    )
    mlflow_tracking_uri: Optional[str] = setting(
        None, help="MLflow tracking URI (loggers: mlflow; null: a local file store, file: URI of output_dir/mlruns)"
    )
    mlflow_experiment: str = setting("lever-plugins", help="MLflow experiment name (loggers: mlflow)")

    # distributed (LAVIS keys)
    distributed: bool = setting(False, help="set automatically under torchrun / --nproc")
    world_size: int = setting(1, help="set automatically under torchrun / --nproc", ge=1)
    dist_url: str = setting("env://", help="torch.distributed init method")
    dist_timeout_s: int = setting(
        7200, help="seconds a rank waits at a collective (rank 0 alone embeds / writes data meanwhile)", ge=60
    )
    find_unused_parameters: bool = setting(False, help="DDP's find_unused_parameters (needed only if some trainable weights get no gradient)")
    gather_negatives: bool = setting(
        True, help="contrastive losses use every rank's batch as negatives (all-gather with gradient, as BLIP-2, "
        "SPRC's LAVIS and LAPS): N processes x B train like one process x N*B; false: each rank its own batch"
    )

    def logger_problems(self) -> Iterator[str]:
        loggers = self.loggers
        if loggers is not None:
            repeated = sorted({name for name in loggers if loggers.count(name) > 1})
            if repeated:
                yield f"loggers: {', '.join(repeated)} listed more than once"
            if "csv" not in loggers:
                yield ("loggers: csv is always written (metrics.csv / metrics.jsonl drive --resume and the run "
                       f"summary); list it too, e.g. [csv, {', '.join(loggers) or 'wandb'}]")
            for name in dict.fromkeys(loggers):
                if name in LOGGER_PACKAGES and not logger_installed(name):
                    package = LOGGER_PACKAGES[name][1]
                    alternative = " (or mlflow)" if name == "mlflow" else ""
                    yield (f"loggers: {name} needs the {package} package, which is not installed: "
                           f"pip install {package}{alternative}")
        active = set(resolved_loggers(loggers))
        for name, keys in LOGGER_KEYS.items():
            if name not in active:
                for key in keys:
                    if self.differs_from_default(key):
                        yield f"{key}: read only with {name} in loggers (loggers: [{', '.join(sorted(active))}])"
        if self.tracker_run_name is not None and not active & {"wandb", "mlflow"}:
            yield "tracker_run_name: read only with wandb or mlflow in loggers"

    def extra_problems(self) -> Iterator[str]:
        yield from self.logger_problems()
        if self.num_threads != "auto" and (isinstance(self.num_threads, bool) or self.num_threads < 1):
            yield f"num_threads: expected auto or a number >= 1, got {self.num_threads!r}"
        reads = SCHEDULE_KEYS[self.lr_sched]
        for key in SCHEDULE_KEY_UNION:
            if key not in reads and self.differs_from_default(key):
                yield (f"{key}: lr_sched {self.lr_sched} does not read this key (it reads {', '.join(reads)}); "
                       "remove it or choose a schedule that reads it")
        if self.lr_sched == "lever_onecycle_lr":
            if self.lr_horizon_epochs is not None and self.lr_horizon_epochs < self.max_epoch:
                yield (f"lr_horizon_epochs: {self.lr_horizon_epochs} < max_epoch {self.max_epoch}; the one-cycle "
                       "schedule ends at its horizon (null: max_epoch)")
            if self.onecycle_cycle_momentum and self.differs_from_default("beta1"):
                yield ("beta1: lever_onecycle_lr with onecycle_cycle_momentum: true sets beta1 at every step "
                       "(onecycle_max_momentum -> onecycle_base_momentum -> back); remove beta1 or set "
                       "onecycle_cycle_momentum: false")
            if not self.onecycle_cycle_momentum:
                for key in ("onecycle_base_momentum", "onecycle_max_momentum"):
                    if self.differs_from_default(key):
                        yield f"{key}: read only with onecycle_cycle_momentum: true"
        if self.lr_sched == "lever_multistep_lr" and not self.lr_milestones:
            yield "lr_milestones: lever_multistep_lr needs at least one milestone epoch"
        if self.warmup_steps > 0 and self.warmup_lr < 0:
            yield "warmup_lr: warmup_steps > 0 needs warmup_lr >= 0 (the warm-up start value)"
