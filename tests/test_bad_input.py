"""Bad input through `lever-plugins run`: one clear line naming the file/key/entry, exit 2, nothing lost."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "recipes", "demo", "cirr_gated.yaml")
ENV = dict(os.environ, OMP_NUM_THREADS="1")
SMOKE = ["run.max_epoch=2", "run.batch_size_train=16", "run.progress_bar=false", "run.save_gate_maps=0",
         "datasets.lever_cirr.max_train_samples=32", "datasets.lever_cirr.max_eval_samples=16",
         "datasets.lever_cirr.splits=[train,val]", "run.test_splits=[]"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from lever_plugins.datasets.demo_cirr import generate_demo_cirr

    root = tmp_path_factory.mktemp("demo_cirr")
    generate_demo_cirr(root, image_size=64)
    return root


def _run(*sets: str):
    args = [a for s in (*SMOKE, *sets) for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "lever_plugins.cli", "run", DEMO, *args],
                          cwd=REPO, env=ENV, capture_output=True, text=True)


def _error_lines(result) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_missing_weight_file_is_named_before_anything_runs(tmp_path):
    result = _run(f"model.pretrained={tmp_path}/blip2_pretrained.pth", f"run.output_dir={tmp_path}/out")
    assert result.returncode == 2
    assert _error_lines(result) == [f"error: {DEMO}: model.pretrained: file not found: {tmp_path}/blip2_pretrained.pth"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.lavis
def test_cirr_entry_without_target_names_file_and_pairid(tmp_path, demo_data):
    root = tmp_path / "cirr"
    shutil.copytree(demo_data, root)
    captions = root / "captions" / "cap.rc2.val.json"
    entries = json.loads(captions.read_text())
    del entries[3]["target_hard"]
    captions.write_text(json.dumps(entries))
    result = _run(f"datasets.lever_cirr.root={root}", f"run.output_dir={tmp_path}/out")
    assert result.returncode == 2
    (line,) = _error_lines(result)
    assert str(captions) in line and f"pairid {entries[3]['pairid']}" in line and "'target_hard'" in line


@pytest.mark.slow
@pytest.mark.lavis
def test_undecodable_image_names_the_file_and_who_uses_it(tmp_path, demo_data):
    root = tmp_path / "cirr"
    shutil.copytree(demo_data, root)
    split = json.loads((root / "image_splits" / "split.rc2.train.json").read_text())
    entries = json.loads((root / "captions" / "cap.rc2.train.json").read_text())
    broken = entries[0]["reference"]
    (root / split[broken]).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    result = _run(f"datasets.lever_cirr.root={root}", f"run.output_dir={tmp_path}/out",
                  "datasets.lever_cirr.max_train_samples=16")
    assert result.returncode == 2
    (line,) = _error_lines(result)
    assert os.path.basename(split[broken]) in line and "cap.rc2.train.json" in line


@pytest.mark.slow
@pytest.mark.lavis
def test_non_finite_loss_stops_naming_step_and_last_good_checkpoint(tmp_path, demo_data, monkeypatch):
    from lever_plugins.compat import import_lavis

    import_lavis()
    import lever_plugins.registry  # noqa: F401
    import lavis.tasks as tasks
    from lavis.common.config import Config
    from lavis.common.registry import registry

    from lever_plugins.models.blip2_cir import Blip2CirModel
    from lever_plugins.recipes import apply_overrides
    from lever_plugins.tasks.base import NonFiniteLoss

    real_forward = Blip2CirModel.forward

    def forward_that_diverges(self, samples):
        out = real_forward(self, samples)
        if samples["epoch"] == 1 and samples["iters"] == 1:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Blip2CirModel, "forward", forward_that_diverges)
    recipe = apply_overrides(yaml.safe_load(open(DEMO)), [*SMOKE, f"datasets.lever_cirr.root={demo_data}",
                                                          f"run.output_dir={tmp_path / 'out'}"])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    cfg = Config(SimpleNamespace(cfg_path=str(tmp_path / "recipe.yaml"), options=None))
    task = tasks.setup_task(cfg)
    runner = registry.get_runner_class("lever_runner")(
        cfg=cfg, job_id="", task=task, model=task.build_model(cfg), datasets=task.build_datasets(cfg)
    )
    with pytest.raises(NonFiniteLoss) as info:
        runner.train()
    message = str(info.value)
    assert "at epoch 1 step 1" in message
    assert str(tmp_path / "out" / "checkpoint_last.pth") in message
    assert (tmp_path / "out" / "checkpoint_last.pth").is_file()  # the last good checkpoint survives
