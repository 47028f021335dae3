"""Plugin packages: another distribution adds plugins through the entry-point group ``lever_plugins.plugins``.

A tiny distribution is laid out in tmp_path the way an installed one is found (a package plus a
``*.dist-info`` folder holding ``METADATA`` and ``entry_points.txt``, which is all importlib.metadata reads),
put on ``PYTHONPATH``, and driven in subprocesses so this process's catalogue and LAVIS registry stay clean.
Three more distributions are broken in three ways; the good one and our own plugins must keep working.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FILES = {
    "acme_lever/__init__.py": "",
    # the entry point's module: pure data, as `list` and `validate` import it
    "acme_lever/plugins.py": '''
        import os

        from lever_plugins.catalog import PluginSpec

        CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
        PLUGINS = [
            PluginSpec(kind="model", name="acme_toy", target="acme_lever.lavis_parts:ToyModel",
                       purpose="a toy model from a plugin package", settings="acme_lever.settings:ToyModelSettings",
                       recipe_block="model", model_types=("tiny",), config_root=CONFIGS),
            PluginSpec(kind="dataset", name="acme_numbers", target="acme_lever.lavis_parts:NumbersBuilder",
                       purpose="numbers in a row", settings="acme_lever.settings:NumbersSettings",
                       recipe_block="datasets.acme_numbers", config_root=CONFIGS),
            PluginSpec(kind="task", name="acme_task", target="acme_lever.lavis_parts:ToyTask",
                       purpose="trains the toy model", settings="acme_lever.settings:ToyRunSettings", recipe_block="run"),
        ]
        NOT_A_LIST = 42
        TAKEN = [PluginSpec(kind="task", name="acme_task", target="elsewhere:Task", purpose="a second acme_task")]


        def ghost_rows():
            return [PluginSpec(kind="model", name="acme_ghost", target="acme_lever.nowhere:Ghost",
                               purpose="its class does not import"),
                    PluginSpec(kind="model", name="blip2", target="acme_lever.lavis_parts:ToyModel",
                               purpose="wants a name LAVIS has")]
    ''',
    "acme_lever/settings.py": '''
        from dataclasses import dataclass
        from typing import Literal

        from lever_plugins.schema import Settings, setting
        from lever_plugins.schemas.run import RunSettings


        @dataclass(kw_only=True)
        class ToyModelSettings(Settings):
            arch: Literal["acme_toy"] = setting(help="registered model name")
            model_type: Literal["tiny"] = setting(help="size preset")
            hidden: int = setting(8, help="width of the toy layer", ge=1)


        @dataclass(kw_only=True)
        class NumbersSettings(Settings):
            count: int = setting(16, help="how many numbers", ge=1)


        @dataclass(kw_only=True)
        class ToyRunSettings(RunSettings):
            toy_flag: bool = setting(False, help="a run key only acme_task reads")
    ''',
    "acme_lever/lavis_parts.py": '''
        from lever_plugins.compat import import_lavis

        import_lavis()

        import torch
        from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
        from lavis.models.base_model import BaseModel
        from lavis.tasks.base_task import BaseTask

        from lever_plugins import catalog, recipes


        class ToyModel(BaseModel):
            PRETRAINED_MODEL_CONFIG_DICT = catalog.preset_config_paths("acme_toy")

            def __init__(self, settings):
                super().__init__()
                self.settings = settings
                self.linear = torch.nn.Linear(settings.hidden, 1)

            @classmethod
            def from_config(cls, cfg):
                return cls(recipes.model_settings_from_config(cfg))


        class NumbersBuilder(BaseDatasetBuilder):
            DATASET_CONFIG_DICT = {"default": catalog.dataset_config_path("acme_numbers")}


        class ToyTask(BaseTask):
            pass
    ''',
    "acme_lever/configs/models/acme_toy_tiny.yaml": "model:\n  arch: acme_toy\n  model_type: tiny\n  hidden: 4\n",
    "acme_lever/configs/datasets/acme_numbers.yaml": "datasets:\n  acme_numbers:\n    count: 10\n",
    "acme_lever-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: acme-lever\nVersion: 0.1\n",
    "acme_lever-0.1.dist-info/entry_points.txt":
        "[lever_plugins.plugins]\nacme = acme_lever.plugins:PLUGINS\nghost = acme_lever.plugins:ghost_rows\n",
    # broken: its module does not exist
    "acme_missing-0.2.dist-info/METADATA": "Metadata-Version: 2.1\nName: acme-missing\nVersion: 0.2\n",
    "acme_missing-0.2.dist-info/entry_points.txt": "[lever_plugins.plugins]\nmissing = acme_missing.plugins:PLUGINS\n",
    # broken: not a list of PluginSpec; and a row whose name another package has
    "acme_wrong-0.3.dist-info/METADATA": "Metadata-Version: 2.1\nName: acme-wrong\nVersion: 0.3\n",
    "acme_wrong-0.3.dist-info/entry_points.txt":
        "[lever_plugins.plugins]\nwrong = acme_lever.plugins:NOT_A_LIST\ntaken = acme_lever.plugins:TAKEN\n",
}

EXPECTED_ERRORS = [
    ("acme-missing 0.2, entry point missing = acme_missing.plugins:PLUGINS", "cannot load it (ModuleNotFoundError"),
    ("acme-wrong 0.3, entry point taken = acme_lever.plugins:TAKEN",
     "task 'acme_task' skipped: task name 'acme_task' is already taken by acme-lever 0.1, entry point acme"),
    ("acme-wrong 0.3, entry point wrong = acme_lever.plugins:NOT_A_LIST",
     "expected a list of lever_plugins.catalog.PluginSpec (or a function returning one), got int"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin_site")
    for relative, text in FILES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


def _env(site) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "OMP_NUM_THREADS": "1"}


def _cli(site, *args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lever_plugins.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=_env(site), timeout=300)


def _python(site, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=_env(site),
                          timeout=600)


def _recipe(tmp_path, **run) -> str:
    recipe = {"model": {"arch": "acme_toy", "model_type": "tiny"}, "datasets": {"acme_numbers": {}},
              "run": {"task": "acme_task", "output_dir": str(tmp_path / "out"), **run}}
    path = tmp_path / "acme.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_list_shows_a_plugin_package_and_names_each_broken_one_in_one_line(site):
    result = _cli(site, "list")
    assert result.returncode == 1, result.stderr  # something is broken: say so in the exit code too
    out = result.stdout
    assert "lever_blip2_cir" in out and "lever_runner" in out  # ours, untouched
    assert "model        acme_toy" in out and "acme_lever.lavis_parts:ToyModel" in out
    assert "from plugin package acme-lever 0.1, entry point acme = acme_lever.plugins:PLUGINS" in out
    assert "model_type: tiny" in out and "hidden (int, default 8): width of the toy layer" in out
    assert "toy_flag (bool, default False): a run key only acme_task reads" in out
    assert "acme_ghost" in out  # its class is imported only when registering
    errors = result.stderr.strip().splitlines()
    assert len(errors) == len(EXPECTED_ERRORS), result.stderr
    for line, (label, why) in zip(errors, EXPECTED_ERRORS):
        assert line.startswith(f"error: plugin package {label}: ") and why in line, line


def test_loading_plugin_packages_imports_neither_torch_nor_lavis(site):
    probe = _python(site, "import sys; from lever_plugins import catalog\n"
                          "rows = catalog.external_plugins(); [row.settings_class() for row in rows]\n"
                          "print([row.name for row in rows], [m for m in ('torch', 'lavis', 'transformers') if m in sys.modules])")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "['acme_toy', 'acme_numbers', 'acme_task', 'acme_ghost', 'blip2'] []"


def test_validate_reads_a_plugin_packages_schema_and_presets(site, tmp_path):
    recipe = _recipe(tmp_path, toy_flag=True)
    ok = _cli(site, "validate", recipe)
    assert ok.returncode == 0, ok.stderr
    assert "OK (model acme_toy/tiny, task acme_task, datasets acme_numbers)" in ok.stdout
    dry = _cli(site, "run", recipe, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    resolved = yaml.safe_load(dry.stdout.split("# plan:")[0])
    assert resolved["model"]["hidden"] == 4  # from the package's preset, configs/models/acme_toy_tiny.yaml
    assert resolved["datasets"]["acme_numbers"]["count"] == 10  # from its dataset defaults
    assert resolved["run"]["toy_flag"] is True and resolved["run"]["runner"] == "lever_runner"

    bad = _cli(site, "validate", recipe, "--set", "model.hiden=3", "--set", "datasets.acme_numbers.count=0",
               "--set", "run.toy_flg=false")
    assert bad.returncode == 2
    assert "model.hiden: unknown key (did you mean 'hidden'?)" in bad.stderr
    assert "datasets.acme_numbers.count:" in bad.stderr and ">= 1" in bad.stderr
    assert "run.toy_flg: unknown key (did you mean 'toy_flag'?)" in bad.stderr
    assert "Traceback" not in bad.stderr

    typo = _cli(site, "validate", recipe, "--set", "model.arch=acme_tyo")
    assert typo.returncode == 2 and "unknown model 'acme_tyo' (did you mean 'acme_toy'?)" in typo.stderr
    assert "acme-missing 0.2, entry point missing" in typo.stderr  # why a name may be unknown


def test_a_recipe_of_ours_never_reads_the_entry_points(site):
    probe = _python(site, "from lever_plugins import catalog\n"
                          "from lever_plugins.recipes import load_recipe\n"
                          "load_recipe('recipes/demo/cirr_gated.yaml')\n"
                          "print(catalog._external is None)")
    assert probe.returncode == 0 and probe.stdout.strip() == "True", probe.stderr


@pytest.mark.lavis
def test_registry_registers_a_plugin_package_and_skips_the_broken_with_a_warning(site):
    pytest.importorskip("lavis")
    probe = _python(site, textwrap.dedent('''
        import json, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import lever_plugins.registry as lever_registry
        from lavis.common.registry import registry
        from omegaconf import OmegaConf
        model = registry.get_model_class("acme_toy").from_config(OmegaConf.create({"arch": "acme_toy", "model_type": "tiny"}))
        print(json.dumps({
            "acme": [registry.get_model_class("acme_toy").__name__, registry.get_builder_class("acme_numbers").__name__,
                     registry.get_task_class("acme_task").__name__],
            "ours": [registry.get_model_class("lever_blip2_cir").__name__, registry.get_runner_class("lever_runner").__name__],
            "ghost": registry.get_model_class("acme_ghost") is None,
            "blip2": registry.get_model_class("blip2").__module__,
            "hidden": model.linear.in_features,
            "warnings": [str(w.message) for w in caught if w.category is lever_registry.PluginLoadWarning],
            "errors": lever_registry.PLUGIN_ERRORS,
        }))
    '''))
    assert probe.returncode == 0, probe.stderr[-3000:]
    state = json.loads(probe.stdout.strip().splitlines()[-1])
    assert state["acme"] == ["ToyModel", "NumbersBuilder", "ToyTask"]
    assert state["ours"] == ["Blip2CirModel", "LeverRunner"] and state["ghost"] is True
    assert state["blip2"] == "lavis.models.blip2_models.blip2_qformer"  # LAVIS's own name is never taken
    assert state["hidden"] == 4  # the package's preset, through LAVIS's from_config
    assert state["warnings"] == state["errors"] and len(state["errors"]) == len(EXPECTED_ERRORS) + 2
    for line, (label, why) in zip(state["errors"], EXPECTED_ERRORS):
        assert line.startswith(f"plugin package {label}: ") and why in line, line
    ghost, clash = state["errors"][-2:]
    prefix = "plugin package acme-lever 0.1, entry point ghost = acme_lever.plugins:ghost_rows: "
    assert ghost.startswith(prefix + "model 'acme_ghost' not registered (ModuleNotFoundError"), ghost
    assert clash.startswith(prefix + "model 'blip2' not registered (RegistryConflict: LAVIS model name 'blip2' is "
                            "already registered to lavis.models.blip2_models.blip2_qformer.Blip2Qformer"), clash
