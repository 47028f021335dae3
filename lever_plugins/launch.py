"""What ``lever-plugins run`` does after the recipe validated: prepare the output dir, then run LAVIS's
own sequence (Config -> setup_task -> build_datasets -> build_model -> runner.train()).

Also used by ``torchrun ... -m lever_plugins.cli run RECIPE`` (every rank calls it; rank 0 prepares the
output directory, the others wait) and by ``--nproc N`` (which re-launches itself under
``torch.distributed.run`` on this machine).
"""
from __future__ import annotations

import datetime
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

from lever_plugins.io import write_text_atomic
from lever_plugins.recipes import ResolvedRecipe
from lever_plugins.run_dir import PENDING_RECIPE_FILE, RECIPE_FILE, free_name
from lever_plugins.schema import RecipeError

CHILD_ENV = "LEVER_PLUGINS_CHILD"
CHILD_RECIPE_ENV = "LEVER_PLUGINS_RECIPE_FILE"  # the recipe file the spawned ranks run (it may be a pending one)
RUN_MARKERS = (RECIPE_FILE, "checkpoint_last.pth", "checkpoint_best.pth", "metrics.jsonl")


class LaunchError(RuntimeError):
    """A problem found before or while running (bad output dir, missing data, non-finite loss...)."""


def prepare_output_dir(resolved: ResolvedRecipe, *, resume: bool, overwrite: bool) -> str:
    """Check ``run.output_dir`` and write the resolved recipe there; returns the recipe file to run.

    An output dir that already holds a run is refused unless ``resume`` (continue it) or ``overwrite``
    (its files are moved to a timestamped sibling, never deleted). Resuming with a changed recipe writes
    it as ``recipe.pending.yaml``; the run's ``recipe.yaml`` changes only once the checkpoint has loaded
    (:func:`lever_plugins.run_dir.commit_pending_recipe`), so a start that fails loses nothing.
    """
    if resume and overwrite:
        raise LaunchError("--resume and --overwrite contradict each other (--resume continues the run in "
                          "run.output_dir, --overwrite moves it aside and starts afresh); pass one of them")
    output_dir = resolved.output_dir()
    site_packages = [p for p in sys.path if p.endswith("site-packages")]
    if any(os.path.commonpath([output_dir, p]) == p for p in site_packages if os.path.isdir(p)):
        raise LaunchError(f"run.output_dir: {output_dir} is inside site-packages; choose a directory of your own")
    existing = [m for m in RUN_MARKERS if os.path.exists(os.path.join(output_dir, m))]
    if existing and not (resume or overwrite):
        raise LaunchError(
            f"run.output_dir: {output_dir} already holds a run ({', '.join(existing)}); "
            "pass --resume to continue it or --overwrite to start afresh (old files are kept aside)"
        )
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if existing and overwrite:
        aside = free_name(f"{output_dir.rstrip(os.sep)}.old-{stamp}")
        shutil.move(output_dir, aside)
        logging.getLogger(__name__).warning("moved the previous run in %s to %s", output_dir, aside)
    os.makedirs(output_dir, exist_ok=True)
    recipe_path = os.path.join(output_dir, RECIPE_FILE)
    pending_path = os.path.join(output_dir, PENDING_RECIPE_FILE)
    text = resolved.to_yaml()
    if os.path.isfile(pending_path):  # left by an earlier start that failed
        os.remove(pending_path)
    if resume and os.path.isfile(recipe_path):
        with open(recipe_path, encoding="utf-8") as handle:
            if handle.read() == text:
                return recipe_path
        # changed settings: the run's recipe.yaml stays until the checkpoint loads into the new model
        write_text_atomic(pending_path, text)
        return pending_path
    write_text_atomic(recipe_path, text)
    return recipe_path


def _setup_logging(output_dir: str, is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(os.path.join(output_dir, "run.log"), encoding="utf-8"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    for noisy in ("PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_pipeline(recipe_path: str, *, resume: bool = False):
    """LAVIS's training sequence on a resolved recipe file; returns the runner."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
    import lever_plugins.registry  # noqa: F401  (registers our names, imports LAVIS)
    from lavis.common.config import Config
    from lavis.common.registry import registry
    import lavis.tasks as lavis_tasks

    from lever_plugins.runners import distributed as lever_dist

    cfg = Config(SimpleNamespace(cfg_path=recipe_path, options=[f"run.resume={str(bool(resume)).lower()}"]))
    run_cfg = cfg.run_cfg
    run_cfg.distributed = lever_dist.is_initialized()
    run_cfg.world_size = lever_dist.world_size()
    _seed_everything(int(run_cfg.seed) + lever_dist.rank())
    task = lavis_tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    runner_cls = registry.get_runner_class(run_cfg.runner)
    runner = runner_cls(cfg=cfg, job_id="", task=task, model=model, datasets=datasets)
    runner.train()
    return runner


@dataclass(frozen=True)
class Nodes:
    """Where this machine sits in a multi-node run (torchrun's static rendezvous)."""

    count: int = 1
    rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def problems(self) -> list[str]:
        out = []
        if self.count < 1:
            out.append(f"--nnodes: expected >= 1, got {self.count}")
        if not 0 <= self.rank < max(self.count, 1):
            out.append(f"--node-rank: expected 0 <= node rank < --nnodes ({self.count}), got {self.rank}")
        if not 0 < self.master_port < 65536:
            out.append(f"--master-port: expected a TCP port (1-65535), got {self.master_port}")
        return out


def launch(resolved: ResolvedRecipe, *, resume: bool, overwrite: bool, nproc: int = 1, debug: bool = False,
           nodes: Nodes = Nodes()) -> None:
    """Run a validated recipe here (one process, or this rank of torchrun), or spawn ``nproc`` ranks
    (on each of ``nodes.count`` machines)."""
    from lever_plugins.runners import distributed as lever_dist

    resume = resume or bool(resolved.data["run"].get("resume"))
    if nodes.count > 1 and not lever_dist.launched_by_torchrun():
        _spawn_multinode(resolved, nproc=nproc, nodes=nodes, resume=resume, overwrite=overwrite, debug=debug)
        return
    if nproc > 1 and not lever_dist.launched_by_torchrun():
        recipe_path = prepare_output_dir(resolved, resume=resume, overwrite=overwrite)
        _spawn(recipe_path, nproc=nproc, resume=resume, debug=debug)
        return
    run = resolved.data["run"]
    lever_dist.init_from_env(device=run["device"], timeout_s=run["dist_timeout_s"], init_method=run["dist_url"])
    problem: Optional[str] = None
    output_dir = resolved.output_dir()
    recipe_path = os.environ.get(CHILD_RECIPE_ENV) if os.environ.get(CHILD_ENV) == "1" else None
    if recipe_path is None and lever_dist.is_main_process():
        try:
            recipe_path = prepare_output_dir(resolved, resume=resume, overwrite=overwrite)
        except LaunchError as exc:
            problem = str(exc)
    problem, recipe_path = lever_dist.broadcast_object((problem, recipe_path))
    if problem:
        raise LaunchError(problem)
    _setup_logging(output_dir, lever_dist.is_main_process())
    if lever_dist.is_initialized():
        import torch.distributed as dist

        logging.getLogger(__name__).info("torch.distributed: %d processes, backend %s", lever_dist.world_size(),
                                         dist.get_backend())
    try:
        run_pipeline(recipe_path, resume=resume)
    except Exception as exc:
        if debug:
            raise
        raise LaunchError(_describe_failure(exc, output_dir)) from exc


def _describe_failure(exc: Exception, output_dir: str) -> str:
    from lever_plugins.tasks.base import NonFiniteLoss

    if isinstance(exc, (NonFiniteLoss, RecipeError, FileNotFoundError, ValueError, KeyError, RuntimeError)):
        text = str(exc) if not isinstance(exc, RecipeError) else "; ".join(exc.problems)
        return f"{type(exc).__name__}: {text} (outputs so far are kept in {output_dir}; rerun with --debug for a traceback)"
    return f"{type(exc).__name__}: {exc} (rerun with --debug for a traceback)"


def _spawn(recipe_path: str, *, nproc: int, resume: bool, debug: bool) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "lever_plugins.cli", "run", recipe_path, "--resume" if resume else "--overwrite",
    ]
    if debug:
        command.append("--debug")
    env = dict(os.environ, **{CHILD_ENV: "1", CHILD_RECIPE_ENV: recipe_path})
    completed = subprocess.run(command, env=env)
    if completed.returncode != 0:
        raise LaunchError(f"{nproc} training processes failed (exit code {completed.returncode}); see the output above")


def _spawn_multinode(resolved: ResolvedRecipe, *, nproc: int, nodes: Nodes, resume: bool, overwrite: bool,
                     debug: bool) -> None:
    """``torchrun --nnodes ... --node_rank ...`` on this machine's share of the ranks.

    Every node runs the same resolved recipe (written to a private temporary file, so nodes need not
    share it); the run's global rank 0 then prepares ``run.output_dir`` exactly as on one node, and the
    other ranks wait for it.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lever-plugins-node") as folder:
        recipe_path = os.path.join(folder, RECIPE_FILE)
        write_text_atomic(recipe_path, resolved.to_yaml())
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes.count}", f"--node_rank={nodes.rank}",
            f"--master_addr={nodes.master_addr}", f"--master_port={nodes.master_port}", f"--nproc_per_node={nproc}",
            "-m", "lever_plugins.cli", "run", recipe_path,
        ]
        command += ["--resume"] if resume else []
        command += ["--overwrite"] if overwrite else []
        command += ["--debug"] if debug else []
        completed = subprocess.run(command, env=dict(os.environ))
    if completed.returncode != 0:
        raise LaunchError(
            f"node {nodes.rank} of {nodes.count}: its {nproc} training process(es) failed (exit code "
            f"{completed.returncode}): a rank failed, or lost contact with the others (did another node stop? "
            f"a collective waits at most run.dist_timeout_s); see the output above"
        )


def describe_plan(resolved: ResolvedRecipe) -> str:
    """What each plugin attaches where, with parameter counts (nothing is built): the header, then every
    plugin the recipe names (its model, task and datasets) that has a ``describe`` hook in the catalog."""
    from lever_plugins import catalog

    data = resolved.data
    model, run = data["model"], data["run"]
    lines = [f"# plan: model {model['arch']} ({model['model_type']}), task {run['task']}, runner {run['runner']}"]
    named = [("model", model["arch"]), ("task", run["task"]), *(("dataset", name) for name in data["datasets"])]
    for kind, name in named:
        lines.extend(catalog.get_plugin(kind, name).plan_lines(data))  # validated: every name is known
    for name, block in data["datasets"].items():
        lines.append(f"#   dataset {name}: root {block.get('root')} splits {block.get('splits')}")
    lines.append(f"#   outputs: {resolved.output_dir()}")
    return "\n".join(lines)
