"""End to end: the demo recipe through LAVIS's own training sequence and through the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

from lever_plugins.compat import import_lavis

import_lavis()
pytestmark = [pytest.mark.lavis, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "recipes", "demo", "cirr_gated.yaml")

SMOKE = [
    "run.max_epoch=1",
    "run.batch_size_train=16",
    "run.batch_size_eval=32",
    "run.progress_bar=false",
    "datasets.lever_cirr.max_train_samples=32",
    "datasets.lever_cirr.max_eval_samples=24",
    "run.save_gate_maps=2",
]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from lever_plugins.datasets.demo_cirr import generate_demo_cirr

    root = tmp_path_factory.mktemp("demo_cirr")
    generate_demo_cirr(root, image_size=64)
    return str(root)


def _smoke_recipe(tmp_path, demo_data, extra=()) -> str:
    with open(DEMO) as handle:
        recipe = yaml.safe_load(handle)
    from lever_plugins.recipes import apply_overrides

    recipe = apply_overrides(recipe, [*SMOKE, f"datasets.lever_cirr.root={demo_data}",
                                      f"run.output_dir={tmp_path / 'out'}", *extra])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_existing_lavis_train_py_sequence_runs_our_recipe(tmp_path, demo_data):
    """What LAVIS's train.py does, plus the one added line ``import lever_plugins.registry``."""
    import lever_plugins.registry  # noqa: F401  (the one line a LAVIS project adds)
    import lavis.tasks as tasks
    from lavis.common.config import Config
    from lavis.common.registry import registry

    recipe = _smoke_recipe(tmp_path, demo_data, ["datasets.lever_cirr.splits=[train,val]", "run.test_splits=[]"])
    cfg = Config(SimpleNamespace(cfg_path=recipe, options=None))
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    runner = registry.get_runner_class(cfg.run_cfg.get("runner", "runner_base"))(
        cfg=cfg, job_id="job", task=task, model=model, datasets=datasets
    )
    runner.train()
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "val"]
    assert 0.0 <= records[1]["recall_at50"] <= 100.0 and "r5_rs1_mean" in records[1]
    assert (out / "checkpoint_best.pth").is_file() and (out / "checkpoint_last.pth").is_file()
    checkpoint = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert checkpoint["epoch"] == 0 and "gated_fusion.alpha" in checkpoint["model"]
    maps = sorted(p.name for p in (out / "gate_maps").glob("*.png"))
    assert len(maps) == 3 and "grid.png" in maps  # two queries and their grid
    from PIL import Image

    with Image.open(out / "gate_maps" / maps[0]) as panel:  # reference + target side by side, colour bar
        assert panel.width > 2 * 224 and panel.height > 224
    again = subprocess.run([sys.executable, "-m", "lever_plugins.cli", "gate-maps", str(out), "-n", "3",
                            "--out", str(tmp_path / "maps")], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(list((tmp_path / "maps").glob("*.png"))) == 4
    # how far the gate opened, per epoch: in the metrics and drawn
    assert isinstance(records[0]["gate_alpha"], float) and 0.0 < records[0]["gate_mean"] < 1.0
    assert records[0]["gate_alpha"] == pytest.approx(float(checkpoint["model"]["gated_fusion.alpha"]), abs=0.05)
    assert (out / "gate_opening.png").stat().st_size > 1000


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "lever_plugins.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_run_writes_outputs_and_protects_an_existing_run(tmp_path, demo_data):
    recipe = _smoke_recipe(tmp_path, demo_data)
    first = _cli("run", recipe)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "out"
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["model"]["vision"]["width"] == 64 and saved["model"]["use_gated_fusion"] is True
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,split")
    submissions = sorted(p.name for p in (out / "result").glob("*submission*.json"))
    assert submissions == ["recall_submission_test1_epochbest.json", "recall_subset_submission_test1_epochbest.json"]
    recall = json.loads((out / "result" / submissions[0]).read_text())
    assert recall["version"] == "rc2" and recall["metric"] == "recall"
    assert all(len(v) == 50 for k, v in recall.items() if k not in ("version", "metric"))

    again = _cli("run", recipe)
    assert again.returncode == 2
    assert "already holds a run" in again.stderr and "--resume" in again.stderr
    assert (out / "checkpoint_best.pth").is_file()  # nothing lost

    overwritten = _cli("run", recipe, "--overwrite", "--set", "run.test_splits=[]")
    assert overwritten.returncode == 0, overwritten.stderr[-3000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert len(aside) == 1 and (aside[0] / "checkpoint_best.pth").is_file()
