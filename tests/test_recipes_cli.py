"""Recipes and the CLI: validation reports every problem, overrides, and no LAVIS import on the fast paths."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import yaml
from click.testing import CliRunner

from lever_plugins.cli import main
from lever_plugins.recipes import apply_overrides, load_recipe, resolve
from lever_plugins.schema import RecipeError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "recipes", "demo", "cirr_gated.yaml")


def _write(tmp_path, text: str, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _demo_recipe() -> dict:
    with open(DEMO) as handle:
        return yaml.safe_load(handle)


def test_demo_recipe_resolves_with_preset_and_defaults():
    resolved = load_recipe(DEMO)
    model = resolved.data["model"]
    assert model["use_gated_fusion"] is True
    assert model["vision"]["width"] == 64  # from the tiny preset
    assert model["gated_fusion"]["alpha_init"] == 0.0
    assert os.path.isabs(resolved.data["run"]["output_dir"])
    assert os.path.isabs(resolved.data["datasets"]["lever_cirr"]["root"])
    assert resolved.data["run"]["max_grad_norm"] is None  # default filled in explicitly


def test_typo_and_bad_values_are_all_reported_at_once():
    recipe = _demo_recipe()
    recipe["model"]["use_gated_fuson"] = True
    recipe["model"]["gated_fusion"]["num_heads"] = "four"
    recipe["run"]["max_epoch"] = 0
    recipe["datasets"]["lever_cirr"]["imagesize"] = 32
    with pytest.raises(RecipeError) as info:
        resolve(recipe)
    problems = info.value.problems
    assert "model.use_gated_fuson: unknown key (did you mean 'use_gated_fusion'?)" in problems
    assert any(p.startswith("model.gated_fusion.num_heads: expected an integer") for p in problems)
    assert "run.max_epoch: must be >= 1, got 0" in problems
    assert any(p.startswith("datasets.lever_cirr.imagesize: unknown key (did you mean 'image_size'?)") for p in problems)
    assert len(problems) == 4


def test_unknown_names_list_known_ones_with_suggestion():
    recipe = _demo_recipe()
    recipe["model"]["arch"] = "lever_blip2_cirr"
    recipe["run"]["task"] = "lever_composed_retreival"
    with pytest.raises(RecipeError) as info:
        resolve(recipe)
    text = "\n".join(info.value.problems)
    assert "unknown model 'lever_blip2_cirr' (did you mean 'lever_blip2_cir'?)" in text
    assert "unknown task 'lever_composed_retreival' (did you mean 'lever_composed_retrieval'?)" in text


def test_overrides_parse_yaml_and_split_on_first_equals():
    recipe = apply_overrides(
        {"model": {"a": 1}}, ["model.use_gated_fusion=false", "run.note=x=y", "model.gated_fusion.alpha_init=0.5"]
    )
    assert recipe["model"]["use_gated_fusion"] is False
    assert recipe["run"]["note"] == "x=y"
    assert recipe["model"]["gated_fusion"]["alpha_init"] == 0.5
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        apply_overrides({}, ["model.use_gated_fusion"])
    with pytest.raises(RecipeError, match="model.a is not a mapping"):
        apply_overrides({"model": {"a": 1}}, ["model.a.b=2"])


def test_baseline_switch_needs_no_source_edit():
    resolved = load_recipe(DEMO, ["model.use_gated_fusion=false"])
    assert resolved.data["model"]["use_gated_fusion"] is False


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, "model:\n  arch: lever_blip2_cir\n  bad: [unclosed\nrun: {}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems[0].startswith(f"{path}:")
    assert "malformed YAML" in info.value.problems[0]


def test_missing_paths_are_reported_by_validate(tmp_path):
    resolved_ok = load_recipe(DEMO, ["datasets.lever_cirr.generate_demo=false", f"datasets.lever_cirr.root={tmp_path}/nope"])
    assert resolved_ok is not None  # paths are only checked on request
    with pytest.raises(RecipeError) as info:
        load_recipe(DEMO, ["datasets.lever_cirr.generate_demo=false", f"datasets.lever_cirr.root={tmp_path}/nope"],
                    check_paths=True)
    assert info.value.problems == [f"datasets.lever_cirr.root: directory not found: {tmp_path}/nope"]


@pytest.mark.parametrize("name", ["cirr_gated.yaml", "cirr_baseline.yaml"])
def test_real_recipes_validate(name):
    resolved = load_recipe(os.path.join(REPO, "recipes", name))
    assert resolved.data["model"]["model_type"] == "pretrain"
    assert resolved.data["model"]["vision"]["width"] == 1408
    assert resolved.data["model"]["use_gated_fusion"] is (name == "cirr_gated.yaml")


def test_cli_validate_exit_codes(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["validate", DEMO])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(main, ["validate", DEMO, "--set", "model.use_gated_fuson=true", "--set", "run.amp=maybe"])
    assert bad.exit_code == 2
    assert "Traceback" not in bad.output
    lines = [line for line in bad.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 2
    missing = runner.invoke(main, ["validate", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 2 and "recipe file not found" in missing.output


def test_cli_dry_run_prints_plan_with_parameter_count():
    result = CliRunner().invoke(main, ["run", DEMO, "--dry-run"])
    assert result.exit_code == 0, result.output
    # tiny preset: vision width 64, Q-Former hidden 64 -> 3*64^2 + 2*64*64 + 4*64 + 1 parameters
    assert f"{3 * 64 * 64 + 2 * 64 * 64 + 4 * 64 + 1:,} parameters" in result.output
    assert "GatedFusionModule(hidden_size=64, text_width=64, num_heads=4)" in result.output
    off = CliRunner().invoke(main, ["run", DEMO, "--dry-run", "--set", "model.use_gated_fusion=false"])
    assert "gated_fusion: off" in off.output


def test_cli_list_shows_every_plugin_and_its_keys():
    from lever_plugins import catalog

    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0
    for spec in catalog.PLUGINS:
        assert spec.name in result.output
        assert spec.name.startswith("lever_")
    assert "use_gated_fusion (bool, default False)" in result.output
    assert "gated_fusion.alpha_init" in result.output


def test_fast_paths_do_not_import_lavis_or_torch():
    code = textwrap.dedent(
        f"""
        import sys
        import lever_plugins
        from click.testing import CliRunner
        from lever_plugins.cli import main
        assert CliRunner().invoke(main, ["--help"]).exit_code == 0
        assert CliRunner().invoke(main, ["validate", {DEMO!r}]).exit_code == 0
        assert CliRunner().invoke(main, ["list"]).exit_code == 0
        heavy = [m for m in ("lavis", "torch", "transformers") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_lazy_public_names():
    import lever_plugins

    assert "GatedFusionModule" in dir(lever_plugins)
    with pytest.raises(AttributeError):
        lever_plugins.NoSuchThing  # noqa: B018


def test_recipe_reference_is_in_sync_with_the_settings():
    from lever_plugins.cli import RECIPE_REFERENCE_PATH, recipe_reference_markdown

    with open(os.path.join(REPO, RECIPE_REFERENCE_PATH), encoding="utf-8") as handle:
        reference = handle.read()
    assert reference == recipe_reference_markdown(), "regenerate with: lever-plugins list --markdown > docs/recipes.md"
    for block in ("## `run` (every task)", "## `model` (model `lever_blip2_cir`)", "`gather_negatives`"):
        assert block in reference
    assert reference.count("| `max_epoch` |") == 1  # the shared run keys appear once, not once per task
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    assert "docs/recipes.md" in readme and "| `max_epoch` |" not in readme
    assert readme.lstrip().startswith("# lever-plugins")
    assert "lever-plugins run recipes/demo/cirr_gated.yaml" in readme.split("\n## ")[0]


def test_exponent_without_dot_is_a_number_but_words_are_not():
    resolved = load_recipe(DEMO, ["run.init_lr=3e-4", "model.gated_fusion.alpha_init=-1E2"])
    assert resolved.data["run"]["init_lr"] == pytest.approx(3e-4)
    assert resolved.data["model"]["gated_fusion"]["alpha_init"] == -100.0
    with pytest.raises(RecipeError, match="run.init_lr: expected a number, got str 'fast'"):
        load_recipe(DEMO, ["run.init_lr=fast"])


def test_task_cross_checks_run_at_validate_time():
    demo = os.path.join(REPO, "recipes", "demo", "icl_pointer.yaml")
    assert load_recipe(demo) is not None
    with pytest.raises(RecipeError) as info:
        load_recipe(demo, ["model.K=7"])
    assert any(p.startswith("model.K: 7 must equal run.beam_search.pool_size") for p in info.value.problems)


def test_output_dir_guard_keeps_everything(tmp_path):
    from lever_plugins.launch import LaunchError, prepare_output_dir

    out = tmp_path / "out"
    first = load_recipe(DEMO, [f"run.output_dir={out}"])
    prepare_output_dir(first, resume=False, overwrite=False)
    (out / "checkpoint_last.pth").write_bytes(b"weights")
    with pytest.raises(LaunchError, match="already holds a run"):
        prepare_output_dir(first, resume=False, overwrite=False)

    changed = load_recipe(DEMO, [f"run.output_dir={out}", "run.max_epoch=9"])
    with pytest.raises(LaunchError, match="--resume and --overwrite contradict each other"):
        prepare_output_dir(changed, resume=True, overwrite=True)
    to_run = prepare_output_dir(changed, resume=True, overwrite=False)
    # until the checkpoint has loaded into the new model, the run's recipe is untouched
    assert to_run == str(out / "recipe.pending.yaml")
    assert yaml.safe_load((out / "recipe.yaml").read_text())["run"]["max_epoch"] == 8
    assert not list(out.glob("recipe.before-resume-*.yaml"))
    from lever_plugins.run_dir import commit_pending_recipe

    commit_pending_recipe(str(out))  # what the runner does once the resume succeeded
    kept = list(out.glob("recipe.before-resume-*.yaml"))
    assert len(kept) == 1 and yaml.safe_load(kept[0].read_text())["run"]["max_epoch"] == 8
    assert yaml.safe_load((out / "recipe.yaml").read_text())["run"]["max_epoch"] == 9
    assert not (out / "recipe.pending.yaml").exists()
    assert prepare_output_dir(changed, resume=True, overwrite=False) == str(out / "recipe.yaml")  # unchanged now

    prepare_output_dir(first, resume=False, overwrite=True)
    prepare_output_dir(first, resume=False, overwrite=True)  # twice in the same second: two distinct asides
    asides = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out.old-"))
    assert len(asides) == 2
    assert any((tmp_path / name / "checkpoint_last.pth").is_file() for name in asides)


def test_cross_block_and_length_checks_of_the_other_plugins():
    seps = os.path.join(REPO, "recipes", "demo", "flickr_seps.yaml")
    with pytest.raises(RecipeError) as info:
        load_recipe(seps, ["model.seps_loss.max_violation=true", "run.warmup_epochs=1"])
    assert info.value.problems[0].startswith("model.seps_loss.max_violation: true would be switched off")
    assert load_recipe(seps, ["model.seps_loss.max_violation=true", "run.warmup_epochs=null"]) is not None
    with pytest.raises(RecipeError, match=r"model.max_txt_len: 65 text tokens \+ 8 prompt tokens exceed qformer.max_position_embeddings"):
        load_recipe(DEMO, ["model.max_txt_len=65"])
    # SPRC's rtc pass places the 8 prompts among the text positions: 57 + 8 > 64 does not fit either.
    with pytest.raises(RecipeError, match=r"57 text tokens \+ 8 prompt tokens exceed"):
        load_recipe(DEMO, ["model.max_txt_len=57"])
    assert load_recipe(DEMO, ["model.max_txt_len=56"]) is not None


@pytest.mark.parametrize(
    "recipe",
    sorted(os.path.relpath(os.path.join(d, f), REPO) for d, _, fs in os.walk(os.path.join(REPO, "recipes"))
           for f in fs if f.endswith(".yaml")),
)
def test_every_shipped_recipe_validates_and_starts_with_a_how_to_comment(recipe):
    path = os.path.join(REPO, recipe)
    assert load_recipe(path) is not None
    with open(path, encoding="utf-8") as handle:
        first = handle.readline()
    assert first.startswith("#"), f"{recipe}: the header comment says what it trains and how to run it"


def test_plugin_lr_scale_needs_a_schedule_that_honours_it():
    assert load_recipe(DEMO, ["model.gated_fusion_lr_scale=20"]) is not None  # lever_onecycle_lr
    with pytest.raises(RecipeError, match=r"model.gated_fusion_lr_scale=20.0 needs run.lr_sched lever_multistep_lr or "
                                          r"lever_onecycle_lr \(LAVIS's linear_warmup_cosine_lr"):
        load_recipe(DEMO, ["model.gated_fusion_lr_scale=20", "run.lr_sched=linear_warmup_cosine_lr"])
    # without the plugin there is nothing to scale
    assert load_recipe(DEMO, ["model.use_gated_fusion=false", "run.lr_sched=linear_warmup_cosine_lr"]) is not None


def test_dry_run_prints_the_plan_and_reports_what_validate_reports():
    real = os.path.join(REPO, "recipes", "cirr_gated.yaml")
    result = CliRunner().invoke(main, ["run", real, "--dry-run"])
    assert result.exit_code == 2
    assert "# plan: model lever_blip2_cir" in result.output  # the plan is still shown
    validate = CliRunner().invoke(main, ["validate", real])
    problems = sorted(line for line in validate.output.splitlines() if line.startswith("error:"))
    assert problems and sorted(line for line in result.output.splitlines() if line.startswith("error:")) == problems


def test_resume_with_overwrite_is_an_error(tmp_path):
    result = CliRunner().invoke(main, ["run", DEMO, "--resume", "--overwrite", "--set", f"run.output_dir={tmp_path}"])
    assert result.exit_code == 2 and "--resume and --overwrite contradict each other" in result.output
    assert not any(tmp_path.iterdir())
