"""``import lever_plugins.registry`` in a LAVIS project: names resolve, idempotent, conflicts named."""
from __future__ import annotations

import importlib

import pytest

from lever_plugins import catalog
from lever_plugins.compat import import_lavis

import_lavis()
pytestmark = pytest.mark.lavis

from lavis.common.registry import registry  # noqa: E402

import lever_plugins.registry as lever_registry  # noqa: E402


@pytest.mark.parametrize("spec", catalog.PLUGINS, ids=lambda s: s.name)
def test_every_plugin_resolves_through_lavis_lookups(spec):
    getter = {
        "model": registry.get_model_class,
        "task": registry.get_task_class,
        "dataset": registry.get_builder_class,
        "runner": registry.get_runner_class,
        "lr_scheduler": registry.get_lr_scheduler_class,
    }[spec.kind]
    assert getter(spec.name) is spec.load()


def test_our_names_never_shadow_lavis_names():
    for spec in catalog.PLUGINS:
        assert spec.name.startswith("lever_")
    assert registry.get_model_class("blip2") is not None  # LAVIS's own names are still there


def test_import_is_idempotent_including_reload():
    before = dict(registry.mapping["model_name_mapping"])
    importlib.import_module("lever_plugins.registry")
    reloaded = importlib.reload(lever_registry)
    assert reloaded.REGISTERED.keys() == {spec.name for spec in catalog.PLUGINS}
    assert registry.mapping["model_name_mapping"].keys() == before.keys()


def test_name_taken_by_a_different_class_is_an_error_naming_both():
    mapping = registry.mapping["model_name_mapping"]
    original = mapping["lever_blip2_cir"]

    class Impostor:
        pass

    mapping["lever_blip2_cir"] = Impostor
    try:
        with pytest.raises(lever_registry.RegistryConflict) as info:
            lever_registry.register_plugin(catalog.get_plugin("model", "lever_blip2_cir"))
        message = str(info.value)
        assert "Impostor" in message and "lever_plugins.models.blip2_cir.Blip2CirModel" in message
    finally:
        mapping["lever_blip2_cir"] = original


def test_unknown_name_lookup_suggests_and_lists_known():
    with pytest.raises(KeyError) as info:
        lever_registry.get_class("model", "lever_blip2_cri")
    assert "did you mean 'lever_blip2_cir'?" in str(info.value)
    assert registry.get_model_class("lever_blip2_cri") is None  # what LAVIS itself would return


def test_doctor_reports_lavis_and_the_shim():
    from click.testing import CliRunner

    from lever_plugins.cli import main

    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "LAVIS imports" in result.output and "registered all plugins" in result.output
    assert "salesforce-lavis" in result.output and "MISSING" not in result.output
