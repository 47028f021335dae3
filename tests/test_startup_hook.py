"""The startup hook: an unmodified LAVIS train.py runs our recipes with the registry line anywhere.

``setup.py`` installs ``lever_plugins_startup.pth``; at interpreter start it only puts
``lever_plugins._startup.ShimFinder`` on ``sys.meta_path`` (nothing heavy is imported), and that re-exposes
LAVIS's three moved helpers on ``transformers.modeling_utils`` right after it loads. Every check runs in a
subprocess, so the import order is the real one.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "recipes", "demo", "cirr_gated.yaml")
NOT_INSTALLED = ("lever_plugins_startup.pth is not active in this environment: reinstall with `pip install -e .` "
                 "(setuptools >= 64) or `pip install .`")


def _python(code: str, *, env=None, cwd=None, args=(), timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def _startup_line() -> str:
    """STARTUP_LINE from setup.py (what the .pth holds), without running setup()."""
    source = open(os.path.join(REPO, "setup.py"), encoding="utf-8").read()
    start = source.index("STARTUP_LINE = (")
    namespace: dict = {}
    exec(source[start:source.index("\n\n", start)], namespace)
    return namespace["STARTUP_LINE"]


def test_hook_is_active_at_startup_and_imports_nothing_heavy():
    probe = _python(
        "import json, sys; print(json.dumps({'hook': any(getattr(f, 'lever_plugins_shim', False) for f in sys.meta_path), "
        "'heavy': [m for m in ('torch', 'transformers', 'lavis', 'numpy', 'typing') if m in sys.modules]}))"
    )
    assert probe.returncode == 0, probe.stderr
    state = json.loads(probe.stdout)
    assert state["hook"], NOT_INSTALLED
    assert state["heavy"] == []
    off = _python("import sys; print(any(getattr(f, 'lever_plugins_shim', False) for f in sys.meta_path))",
                  env={"LEVER_PLUGINS_NO_STARTUP_HOOK": "1"})
    assert off.stdout.strip() == "False"


def test_hook_re_exposes_the_helpers_when_transformers_loads_and_keeps_its_loader():
    probe = _python(
        "import importlib.machinery, sys\n"
        "import transformers.modeling_utils as m, transformers.pytorch_utils as p\n"
        "from transformers.modeling_utils import apply_chunking_to_forward, find_pruneable_heads_and_indices, prune_linear_layer\n"
        "assert apply_chunking_to_forward is p.apply_chunking_to_forward and prune_linear_layer is p.prune_linear_layer\n"
        "assert isinstance(m.__loader__, importlib.machinery.SourceFileLoader), m.__loader__\n"
        "assert m.__spec__.loader is m.__loader__\n"
        "print('ok')\n"
    )
    assert probe.returncode == 0 and probe.stdout.strip() == "ok", probe.stderr[-3000:]


def test_the_pth_line_never_breaks_an_interpreter_without_the_package(tmp_path):
    line = _startup_line()
    assert line.startswith("import ") and line.count("\n") == 1  # site.py runs a .pth line starting with `import`
    # -S: no site-packages, so `lever_plugins` is not importable from tmp_path: the line must stay silent
    bare = _python(line + "import sys; print('lever_plugins' in sys.modules)", args=("-S",), cwd=tmp_path)
    assert bare.returncode == 0 and bare.stdout.strip() == "False" and bare.stderr == "", bare.stderr


@pytest.mark.slow
def test_wheel_and_editable_wheel_put_the_pth_at_the_top_of_site_packages(tmp_path):
    build_meta = pytest.importorskip("setuptools.build_meta")
    if not hasattr(build_meta, "build_editable"):
        pytest.skip("setuptools < 64 has no PEP 660 editable wheels")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), source / name)
    shutil.copytree(os.path.join(REPO, "lever_plugins"), source / "lever_plugins",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheels"
    out.mkdir()
    built = _python(
        "import sys; from setuptools import build_meta as b\n"
        f"print(b.build_wheel({str(out)!r})); print(b.build_editable({str(out)!r}))",
        cwd=source, timeout=600,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheels = sorted(out.glob("*.whl"))
    assert [w.name.split("-")[2] for w in wheels] == ["0.editable", "py3"], wheels  # editable and regular
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            assert archive.read("lever_plugins_startup.pth").decode() == _startup_line(), wheel.name
            record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
            # in RECORD, so `pip uninstall` removes it
            assert "lever_plugins_startup.pth," in archive.read(record).decode()


# LAVIS 1.0.2's train.py (it is in LAVIS's repository, not in the wheel), statement for statement, with the one
# added line placed after `import lavis.tasks`. Copyright (c) 2022, salesforce.com, inc. (BSD-3-Clause).
LAVIS_TRAIN_PY = '''\
import argparse
import os
import random

import numpy as np
import torch
import torch.backends.cudnn as cudnn

import lavis.tasks as tasks
{registry_line}
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank, init_distributed_mode
from lavis.common.logger import setup_logger
from lavis.common.optims import (
    LinearWarmupCosineLRScheduler,
    LinearWarmupStepLRScheduler,
)
from lavis.common.registry import registry
from lavis.common.utils import now

# imports modules for registration
from lavis.datasets.builders import *
from lavis.models import *
from lavis.processors import *
from lavis.runners import *
from lavis.tasks import *


def parse_args():
    parser = argparse.ArgumentParser(description="Training")

    parser.add_argument("--cfg-path", required=True, help="path to configuration file.")
    parser.add_argument(
        "--options",
        nargs="+",
        help="override some settings in the used config, the key-value pair "
        "in xxx=yyy format will be merged into config file (deprecate), "
        "change to --cfg-options instead.",
    )

    args = parser.parse_args()

    return args


def setup_seeds(config):
    seed = config.run_cfg.seed + get_rank()

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    cudnn.benchmark = False
    cudnn.deterministic = True


def get_runner_class(cfg):
    """
    Get runner class from config. Default to epoch-based runner.
    """
    runner_cls = registry.get_runner_class(cfg.run_cfg.get("runner", "runner_base"))

    return runner_cls


def main():
    # set before init_distributed_mode() to ensure the same job_id shared across all ranks.
    job_id = now()

    cfg = Config(parse_args())

    init_distributed_mode(cfg.run_cfg)

    setup_seeds(cfg)

    # set after init_distributed_mode() to only log on master.
    setup_logger()

    cfg.pretty_print()

    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)

    runner = get_runner_class(cfg)(
        cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets
    )
    runner.train()


if __name__ == "__main__":
    main()
'''

SMOKE = {"max_epoch": 1, "batch_size_train": 16, "batch_size_eval": 32, "progress_bar": False, "test_splits": [],
         "save_gate_maps": 2}


def _write_project(tmp_path, registry_line: str) -> tuple[str, str]:
    """A LAVIS project folder: train.py and the demo recipe (smoke-sized, paths inside tmp_path)."""
    with open(DEMO, encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle)
    recipe["run"].update(SMOKE, output_dir=str(tmp_path / "out"))
    recipe["datasets"]["lever_cirr"].update(root=str(tmp_path / "demo_data"), splits=["train", "val"],
                                            max_train_samples=32, max_eval_samples=24)
    recipe_path = tmp_path / "cirr_gated.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    train_py = tmp_path / "train.py"
    train_py.write_text(LAVIS_TRAIN_PY.format(registry_line=registry_line))
    return str(train_py), str(recipe_path)


def _run_train_py(train_py: str, recipe: str, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, train_py, "--cfg-path", recipe], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=900)


@pytest.mark.slow
@pytest.mark.lavis
def test_unmodified_lavis_train_py_runs_the_demo_recipe_with_the_registry_line_after_lavis_imports(tmp_path):
    pytest.importorskip("lavis")
    train_py, recipe = _write_project(tmp_path, "import lever_plugins.registry  # noqa: F401")
    result = _run_train_py(train_py, recipe, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "val"]
    assert 0.0 <= records[1]["recall_at50"] <= 100.0 and "r5_rs1_mean" in records[1]
    assert (out / "checkpoint_best.pth").is_file() and (out / "checkpoint_last.pth").is_file()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["model"]["arch"] == "lever_blip2_cir"
    assert len(list((out / "gate_maps").glob("*.png"))) >= 2  # the task's after_training ran too


@pytest.mark.slow
@pytest.mark.lavis
def test_without_the_hook_lavis_train_py_fails_on_modern_transformers(tmp_path):
    """The control: what the hook fixes (transformers >= 4.56 moved the helpers LAVIS imports)."""
    pytest.importorskip("lavis")
    from importlib.metadata import version

    major, minor = (int(part) for part in version("transformers").split(".")[:2])
    if (major, minor) < (4, 56):
        pytest.skip("transformers <= 4.55 still has the helpers in modeling_utils: nothing to fix")
    train_py, recipe = _write_project(tmp_path, "import lever_plugins.registry  # noqa: F401")
    result = _run_train_py(train_py, recipe, tmp_path, env={"LEVER_PLUGINS_NO_STARTUP_HOOK": "1"})
    assert result.returncode != 0
    assert "cannot import name 'apply_chunking_to_forward' from 'transformers.modeling_utils'" in result.stderr
