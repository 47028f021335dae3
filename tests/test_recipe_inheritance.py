"""Recipe inheritance: ``_base_`` (one or a list, relative, deep-merged), errors naming the chain, key sources."""
from __future__ import annotations

import os
import shutil
import textwrap

import pytest
import yaml
from click.testing import CliRunner

from lever_plugins.cli import main
from lever_plugins.recipes import annotated_yaml, load_recipe, load_recipe_file
from lever_plugins.schema import RecipeError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "recipes", "demo", "cirr_gated.yaml")


def _write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_one_base_is_deep_merged_under_the_recipe(tmp_path):
    _write(tmp_path / "base.yaml", """
        model: {arch: a, gated_fusion: {num_heads: 4, alpha_init: 0.0}, keep: [1, 2]}
        run: {task: t, max_epoch: 8}
    """)
    child = _write(tmp_path / "child.yaml", """
        _base_: base.yaml
        model: {gated_fusion: {num_heads: 8}, keep: [3]}
        run: {seed: 1}
    """)
    data, sources, files = load_recipe_file(child)
    assert data == {
        "model": {"arch": "a", "gated_fusion": {"num_heads": 8, "alpha_init": 0.0}, "keep": [3]},  # lists replace
        "run": {"task": "t", "max_epoch": 8, "seed": 1},
    }
    base_name, child_name = (os.path.abspath(tmp_path / n) for n in ("base.yaml", "child.yaml"))
    assert files == [base_name, child_name]
    assert sources[("model", "gated_fusion", "num_heads")] == child_name
    assert sources[("model", "gated_fusion", "alpha_init")] == base_name
    assert sources[("model", "keep")] == child_name and sources[("run", "max_epoch")] == base_name


def test_a_list_of_bases_merges_in_order_later_wins_and_paths_are_relative_to_each_file(tmp_path):
    _write(tmp_path / "common" / "root.yaml", "run: {seed: 0, max_epoch: 1}\n")
    # a base's own _base_ is relative to the base, not to the recipe that names it
    _write(tmp_path / "common" / "first.yaml", "_base_: root.yaml\nrun: {seed: 1, first: true}\n")
    _write(tmp_path / "second.yaml", "run: {seed: 2, second: true}\n")
    child = _write(tmp_path / "sub" / "child.yaml", "_base_: [../common/first.yaml, ../second.yaml]\nrun: {own: true}\n")
    data, sources, files = load_recipe_file(child)
    assert data == {"run": {"seed": 2, "max_epoch": 1, "first": True, "second": True, "own": True}}
    assert [os.path.basename(f) for f in files] == ["root.yaml", "first.yaml", "second.yaml", "child.yaml"]
    assert os.path.basename(sources[("run", "seed")]) == "second.yaml"
    assert os.path.basename(sources[("run", "max_epoch")]) == "root.yaml"


def test_a_replaced_subtree_keeps_no_stale_sources(tmp_path):
    _write(tmp_path / "base.yaml", "model: {block: {a: 1, b: 2}, flag: 1}\n")
    child = _write(tmp_path / "child.yaml", "_base_: base.yaml\nmodel: {block: none, flag: {x: 1}}\n")
    data, sources, _ = load_recipe_file(child)
    assert data == {"model": {"block": "none", "flag": {"x": 1}}}
    assert set(sources) == {("model", "block"), ("model", "flag", "x")}


def test_cycle_is_an_error_naming_the_chain(tmp_path):
    a = _write(tmp_path / "a.yaml", "_base_: b.yaml\nrun: {}\n")
    _write(tmp_path / "b.yaml", "_base_: a.yaml\nrun: {}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(a)
    a_name, b_name = (os.path.abspath(tmp_path / n) for n in ("a.yaml", "b.yaml"))
    assert info.value.problems == [f"recipe inheritance cycle: {a_name} -> {b_name} -> {a_name}"]
    self_ref = _write(tmp_path / "self.yaml", "_base_: [self.yaml]\n")
    with pytest.raises(RecipeError, match="cycle: .*self.yaml -> .*self.yaml$"):
        load_recipe_file(self_ref)


def test_missing_base_names_the_file_and_who_named_it(tmp_path):
    a = _write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    _write(tmp_path / "b.yaml", "_base_: [nope.yaml]\n")
    with pytest.raises(RecipeError) as info:
        load_recipe_file(a)
    names = {n: os.path.abspath(tmp_path / n) for n in ("a.yaml", "b.yaml", "nope.yaml")}
    assert info.value.problems == [
        f"{names['nope.yaml']}: base recipe not found (named in _base_ of {names['a.yaml']} -> {names['b.yaml']})"
    ]


@pytest.mark.parametrize("bad", ["3", "[]", "[ok.yaml, 4]", "{a: b}", "''"])
def test_base_must_name_files(tmp_path, bad):
    path = _write(tmp_path / "a.yaml", f"_base_: {bad}\n")
    if bad == "[]":  # an empty list is no base at all
        assert load_recipe_file(path)[0] == {}
        return
    with pytest.raises(RecipeError, match=r"_base_: expected a recipe file name or a list of them"):
        load_recipe_file(path)


def test_malformed_base_names_its_file_and_line(tmp_path):
    a = _write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    b = _write(tmp_path / "b.yaml", "run:\n  x: [unclosed\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(a)
    assert info.value.problems[0].startswith(f"{b}:") and "malformed YAML" in info.value.problems[0]


def test_inherited_demo_recipe_resolves_and_run_saves_the_merged_recipe(tmp_path):
    shutil.copy(DEMO, tmp_path / "gated.yaml")
    child = _write(tmp_path / "baseline.yaml", f"""
        # demo baseline over the gated demo
        _base_: gated.yaml
        model: {{use_gated_fusion: false}}
        run: {{output_dir: {tmp_path / 'out'}, save_gate_maps: 0}}
    """)
    resolved = load_recipe(child, ["run.max_epoch=2"])
    expected = load_recipe(DEMO, ["model.use_gated_fusion=false", f"run.output_dir={tmp_path / 'out'}",
                                  "run.save_gate_maps=0", "run.max_epoch=2"])
    assert resolved.data == expected.data
    from lever_plugins.launch import prepare_output_dir

    prepare_output_dir(resolved, resume=False, overwrite=False)
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert saved == resolved.data and "_base_" not in saved


def test_shipped_cirr_baseline_is_the_gated_recipe_with_the_plugin_off():
    baseline = load_recipe(os.path.join(REPO, "recipes", "cirr_baseline.yaml"))
    gated = load_recipe(os.path.join(REPO, "recipes", "cirr_gated.yaml"),
                        ["model.use_gated_fusion=false", "run.save_gate_maps=0", "run.output_dir=output/cirr_baseline"])
    assert baseline.data == gated.data
    with open(os.path.join(REPO, "recipes", "cirr_baseline.yaml"), encoding="utf-8") as handle:
        keys = [line for line in handle if line.strip() and not line.lstrip().startswith("#")]
    assert len(keys) <= 8, "cirr_baseline.yaml should be a few lines over cirr_gated.yaml"


def test_annotated_yaml_loads_back_to_the_same_data():
    data = {"a": {"b": [1, 2], "c": {}, "d": [{"x": 1}, {"y": [2]}], "e": "multi\nline: # not a comment", "f": None},
            "g": 1.0e-7, "h": "x: y"}
    sources = {("a", "b"): "one.yaml", ("a", "d"): "two.yaml", ("a", "e"): "three.yaml", ("g",): "--set"}
    text = annotated_yaml(data, sources)
    assert yaml.safe_load(text) == data
    assert "b: [1, 2]  # one.yaml" in text and "g: 1.0e-07  # --set" in text
    assert "# a.d: two.yaml" in text  # a multi-line value gets its note on the line above


def test_dry_run_prints_the_merged_recipe_with_each_keys_source(tmp_path):
    shutil.copy(DEMO, tmp_path / "gated.yaml")
    child = _write(tmp_path / "baseline.yaml", "_base_: gated.yaml\nmodel: {use_gated_fusion: false}\n")
    result = CliRunner().invoke(main, ["run", child, "--dry-run", "--set", "run.max_epoch=3"])
    assert result.exit_code == 0, result.output
    gated_name, child_name = (os.path.abspath(tmp_path / n) for n in ("gated.yaml", "baseline.yaml"))
    lines = result.output.splitlines()
    assert lines[0] == f"# resolved recipe: {child_name} <- {gated_name} (later files win)"
    assert f"  use_gated_fusion: false  # {child_name}" in lines
    assert f"    num_heads: 4  # {gated_name}" in lines  # model.gated_fusion.num_heads, from the base
    assert "  max_epoch: 3  # --set" in lines
    assert any(line.startswith("    width: 64  # preset ") and line.endswith("lever_blip2_cir_tiny.yaml") for line in lines)
    assert "  max_grad_norm: null" in lines  # a schema default: no source comment
    assert "gated_fusion: off" in result.output  # the plan still follows
    body = result.output.split("\n# plan:")[0]
    assert "_base_" not in yaml.safe_load(body) and yaml.safe_load(body)["model"]["use_gated_fusion"] is False


def test_validate_reports_inheritance_errors_as_bad_input(tmp_path):
    a = _write(tmp_path / "a.yaml", "_base_: missing.yaml\n")
    result = CliRunner().invoke(main, ["validate", a])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "base recipe not found" in result.output and "missing.yaml" in result.output
