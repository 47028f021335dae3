"""The plugin contract, checked on every model plugin in the catalogue and on a fourth, toy plugin.

Every model row names tiny presets (``PluginSpec.tiny_model_types``); for each, with the plugin off and
on, the model built by its own ``from_config``:

- returns a finite scalar ``loss`` (and finite scalar parts) on its own ``example_samples()``;
- sends a gradient to exactly the parameters the runner's optimiser trains, each once, and none to a
  frozen one (DDP needs every trained parameter to get a gradient); a frozen part stays in eval mode;
- saved as the runner saves it (frozen weights left out) and loaded as the runner loads it into a fresh
  model, gives the same outputs;
- is described by ``--dry-run`` (its ``describe`` hook's lines in the plan).

The toy plugin (``tests/toy_plugin/toy_lever_plugin``: settings, a pure-torch module, a LAVIS model, a
dataset, a task, catalogue rows, presets) is defined only inside the tests; installed as a plugin package
it is picked up by ``list``, ``validate``, ``run --dry-run`` and ``run`` with no file of ``lever_plugins``
touched.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml

from lever_plugins import catalog

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TOY_ROOT = os.path.join(HERE, "toy_plugin")
sys.path.insert(0, TOY_ROOT)

from toy_lever_plugin.plugins import PLUGINS as TOY_PLUGINS  # noqa: E402  (pure data)

TOY_ROWS = tuple(dataclasses.replace(row, origin="toy-lever-plugin 0.1 (tests/toy_plugin)") for row in TOY_PLUGINS)
MODEL_ROWS = [spec for spec in catalog.PLUGINS + TOY_ROWS if spec.kind == "model"]

# the plugin switched on, and a frozen backbone, beside each preset as it ships
VARIANTS = {
    "lever_blip2_cir": ({"use_gated_fusion": True}, {"vision": {"freeze": True}}),
    "lever_blip2_seps": ({"vision": {"freeze": True}},),
    "toy_regressor": ({"use_adapter": True}, {"freeze_encoder": False}),
}


def _cases():
    for spec in MODEL_ROWS:
        for model_type in spec.tiny_model_types:
            for index, overrides in enumerate(({}, *VARIANTS.get(spec.name, ()))):
                label = f"{spec.name}-{model_type}" + (f"-{'-'.join(overrides)}" if overrides else "")
                yield pytest.param(spec, model_type, overrides, id=label)


CASES = list(_cases())


@pytest.fixture(autouse=True)
def toy_in_the_catalogue(monkeypatch):
    """The toy rows as if read from an installed plugin package (this process only)."""
    monkeypatch.setattr(catalog, "_external", TOY_ROWS)
    monkeypatch.setattr(catalog, "_load_errors", [])


def _build(spec, model_type, overrides, seed=0):
    import torch

    torch.manual_seed(seed)
    return spec.load().from_config({"arch": spec.name, "model_type": model_type, **overrides})


def _scalars(out) -> dict:
    import torch

    return {k: v.detach().float() for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}


def _eval_outputs(model, samples) -> dict:
    import torch

    model.eval()
    with torch.no_grad():
        return _scalars(model(samples))


@pytest.mark.parametrize("spec", MODEL_ROWS, ids=lambda s: s.name)
def test_every_model_plugin_names_tiny_presets_and_describes_itself(spec):
    assert spec.tiny_model_types, f"{spec.name}: no tiny preset for the contract test and the demos"
    assert set(spec.tiny_model_types) <= set(spec.model_types)
    assert spec.describe, f"{spec.name}: no describe hook for --dry-run"


@pytest.mark.lavis
@pytest.mark.parametrize("spec, model_type, overrides", CASES)
def test_finite_loss_and_gradients_reach_exactly_what_the_optimiser_trains(spec, model_type, overrides, one_thread):
    import torch

    from lever_plugins.runners.runner import optimizer_param_groups

    model = _build(spec, model_type, overrides).train()
    out = model(model.example_samples(batch_size=3))
    scalars = _scalars(out)
    assert "loss" in scalars and out["loss"].dim() == 0
    assert all(torch.isfinite(v) for v in scalars.values()), scalars
    out["loss"].backward()

    groups = optimizer_param_groups(model, weight_decay=0.05)
    in_groups = [id(p) for group in groups for p in group["params"]]
    assert len(in_groups) == len(set(in_groups)), "a parameter is in two optimiser groups"
    names = {id(p): name for name, p in model.named_parameters()}
    trained = {names[i] for i in in_groups}
    assert trained == {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    expects_frozen = overrides.get("vision", {}).get("freeze", False) or (
        spec.name == "toy_regressor" and overrides.get("freeze_encoder", True))
    assert bool(frozen) == expects_frozen, frozen
    # a frozen part runs as in evaluation (no dropout, no batch-norm statistics) while the rest trains
    for name, module in model.named_modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            assert not module.training, f"{name}: frozen but in training mode"
    for name, param in model.named_parameters():
        if name in trained:
            assert param.grad is not None, f"{name}: trained but gets no gradient"
            assert torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, f"{name}: frozen but gets a gradient"


@pytest.mark.lavis
@pytest.mark.parametrize("spec, model_type, overrides", CASES)
def test_saved_and_reloaded_as_the_runner_does_gives_the_same_outputs(spec, model_type, overrides, tmp_path, one_thread):
    import torch

    from lever_plugins.checkpoints import read_torch_file
    from lever_plugins.runners.runner import load_run_weights, optimizer_param_groups, trainable_state_dict

    model = _build(spec, model_type, overrides)
    samples = model.example_samples(batch_size=3)
    before = _eval_outputs(model, samples)
    optimizer = torch.optim.AdamW(optimizer_param_groups(model, weight_decay=0.0), lr=0.05)
    for _ in range(2):
        model.train()
        optimizer.zero_grad()
        model(samples)["loss"].backward()
        optimizer.step()
    trained = _eval_outputs(model, samples)
    assert any(not torch.allclose(before[k], trained[k]) for k in before), "training moved nothing: the test would prove nothing"

    state = trainable_state_dict(model)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert not frozen & set(state), "frozen weights are saved"
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": state}, path)

    fresh = _build(spec, model_type, overrides)  # same seed: the frozen weights a pretrained file would give
    load_run_weights(fresh, read_torch_file(str(path))["model"], str(path))
    reloaded = _eval_outputs(fresh, samples)
    assert reloaded.keys() == trained.keys()
    for key in trained:
        torch.testing.assert_close(reloaded[key], trained[key], rtol=1e-5, atol=1e-6, msg=key)


def _demo_recipe(spec, tmp_path) -> str:
    if spec.origin:
        return _toy_recipe(tmp_path)
    for name in sorted(os.listdir(os.path.join(REPO, "recipes", "demo"))):
        path = os.path.join(REPO, "recipes", "demo", name)
        with open(path, encoding="utf-8") as handle:
            if (yaml.safe_load(handle).get("model") or {}).get("arch") == spec.name:
                return path
    raise AssertionError(f"{spec.name}: no recipe under recipes/demo uses it")


def _toy_recipe(tmp_path, **run) -> str:
    recipe = {
        "model": {"arch": "toy_regressor", "model_type": "tiny", "use_adapter": True},
        "datasets": {"toy_numbers": {"count": 48}},
        "run": {"task": "toy_regression", "output_dir": str(tmp_path / "toy_run"), "device": "cpu", "max_epoch": 3,
                "batch_size_train": 8, "batch_size_eval": 16, "init_lr": 0.01, "num_workers": 0, **run},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize("spec", MODEL_ROWS, ids=lambda s: s.name)
def test_dry_run_plan_holds_the_plugins_own_description(spec, tmp_path):
    from lever_plugins.launch import describe_plan
    from lever_plugins.recipes import load_recipe

    resolved = load_recipe(_demo_recipe(spec, tmp_path))
    plan = describe_plan(resolved).splitlines()
    model = resolved.data["model"]
    assert plan[0].startswith(f"# plan: model {spec.name} ({model['model_type']})")
    own = spec.plan_lines(resolved.data)
    assert own and all(line in plan for line in own)


# ------------------------------------------------------------------ the toy, installed as a plugin package
@pytest.fixture(scope="module")
def toy_site(tmp_path_factory):
    """A ``*.dist-info`` declaring the toy's entry point (what ``pip install`` of a plugin package leaves)."""
    site = tmp_path_factory.mktemp("toy_site")
    info = site / "toy_lever_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-lever-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lever_plugins.plugins]\ntoy = toy_lever_plugin.plugins:PLUGINS\n")
    return site


def _cli(site, *args) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(site), TOY_ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lever_plugins.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600)


def test_list_validate_and_dry_run_pick_up_the_toy_plugin(toy_site, tmp_path):
    listed = _cli(toy_site, "list")
    assert listed.returncode == 0, listed.stderr
    for name in ("toy_regressor", "toy_numbers", "toy_regression"):
        assert name in listed.stdout
    assert "use_adapter (bool, default False): apply ToyAdapter to the encoder features" in listed.stdout

    recipe = _toy_recipe(tmp_path)
    ok = _cli(toy_site, "validate", recipe)
    assert ok.returncode == 0, ok.stderr
    assert "OK (model toy_regressor/tiny, task toy_regression, datasets toy_numbers)" in ok.stdout
    typo = _cli(toy_site, "validate", recipe, "--set", "model.adapter.expansoin=3")
    assert typo.returncode == 2 and "model.adapter.expansoin: unknown key (did you mean 'expansion'?)" in typo.stderr
    mismatch = _cli(toy_site, "validate", recipe, "--set", "datasets.toy_numbers.input_dim=5")  # its cross-check
    assert mismatch.returncode == 2
    assert "datasets.toy_numbers.input_dim: 5 features, but model.input_dim is 6" in mismatch.stderr

    dry = _cli(toy_site, "run", recipe, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    # width 16, expansion 2: adapter 16*32+32 + 32*16+16 + 1, head 16+1; the encoder is frozen
    assert "#   toy_regressor: ToyAdapter on the encoder features; 1,090 trainable parameters" in dry.stdout


@pytest.mark.lavis
@pytest.mark.slow
def test_the_toy_plugin_trains_through_the_cli(toy_site, tmp_path):
    pytest.importorskip("lavis")
    recipe = _toy_recipe(tmp_path)
    result = _cli(toy_site, "run", recipe)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "toy_run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["mse"] for r in records if r.get("split") == "val"]
    assert len(val) == 3 and val[-1] < val[0], records
    assert (out / "checkpoint_best.pth").is_file()
    trained = sum(p.numel() for p in _toy_model_params())
    assert trained == 1090


def _toy_model_params():
    import torch

    from toy_lever_plugin.lavis_parts import ToyRegressor  # noqa: F401  (LAVIS imported by the lavis-marked test)
    from lever_plugins.recipes import model_settings_from_config

    torch.manual_seed(0)
    model = ToyRegressor(model_settings_from_config({"arch": "toy_regressor", "model_type": "tiny", "use_adapter": True}))
    return [p for p in model.parameters() if p.requires_grad]



@pytest.mark.lavis
@pytest.mark.parametrize("task_name, recipe, breaks, expected", [
    ("toy_regression", {"model": {"arch": "toy_regressor", "model_type": "tiny"}, "datasets": {"toy_numbers": {"input_dim": 5}}},
     {}, "datasets.toy_numbers.input_dim: 5 features, but model.input_dim is 6"),
    ("toy_regression", {"model": {"arch": "toy_regressor", "model_type": "tiny", "widht": 8}, "datasets": {"toy_numbers": {}}},
     {}, r"model.widht: unknown key \(did you mean 'width'\?\)"),  # a block's own problem comes first
    ("lever_composed_retrieval", {"model": {"arch": "lever_blip2_cir", "model_type": "tiny", "use_gated_fusion": True,
                                            "gated_fusion_lr_scale": 10.0}, "datasets": {}},
     {"lr_sched": "linear_warmup_cosine_lr"}, "model.gated_fusion_lr_scale=10.0 needs run.lr_sched"),
])
def test_the_tasks_cross_check_runs_before_building_on_lavis_own_path(task_name, recipe, breaks, expected, tmp_path):
    """LAVIS's train.py never resolves a recipe: the model block lacks its preset keys, the dataset block its
    defaults. The task's catalogue cross-check still runs, in ``build_model``, before anything is built."""
    from omegaconf import OmegaConf

    from lever_plugins.schema import RecipeError

    task_cls = catalog.get_plugin("task", task_name).load()
    run = {"task": task_name, "output_dir": str(tmp_path), **breaks}
    cfg = OmegaConf.create({"run_cfg": run, "model_cfg": recipe["model"], "datasets_cfg": recipe["datasets"]})
    task = task_cls.setup_task(cfg)
    with pytest.raises(RecipeError, match=expected):
        task.build_model(cfg)


STUB_MODEL = object()  # what the stubbed LAVIS build_model returns


@pytest.mark.lavis
def test_the_cross_check_runs_once_per_config(tmp_path, monkeypatch):
    """A task that checks early (the ICL task, before its stages) does not pay for it again in build_model."""
    from lavis.tasks.base_task import BaseTask
    from omegaconf import OmegaConf

    from lever_plugins import recipes

    monkeypatch.setattr(BaseTask, "build_model", lambda self, cfg: STUB_MODEL)  # the toy is not in LAVIS's registry here
    calls = []
    real = recipes.cross_block_problems_of_config
    monkeypatch.setattr(recipes, "cross_block_problems_of_config", lambda cfg, run: calls.append(cfg) or real(cfg, run))
    task_cls = catalog.get_plugin("task", "toy_regression").load()
    cfg = OmegaConf.create({"run_cfg": {"task": "toy_regression", "output_dir": str(tmp_path)},
                            "model_cfg": {"arch": "toy_regressor", "model_type": "tiny"},
                            "datasets_cfg": {"toy_numbers": {}}})
    task = task_cls.setup_task(cfg)
    task.check_across_blocks(cfg)
    assert task.build_model(cfg) is STUB_MODEL
    assert len(calls) == 1
    other = OmegaConf.create(OmegaConf.to_container(cfg))
    task.check_across_blocks(other)  # another config is checked again
    assert len(calls) == 2
