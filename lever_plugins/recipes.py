"""Recipes: load YAML (safely), apply ``--set`` overrides, validate every plugin key, resolve defaults.

A recipe is a LAVIS config (``model:``, ``datasets:``, ``run:``). Resolution merges the model preset
(``model_type``) and dataset defaults shipped in ``lever_plugins/configs`` under the recipe, validates
the result against the plugins' settings dataclasses, and returns the fully explicit recipe that ``run``
saves next to its outputs. Nothing here imports torch or LAVIS.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import yaml

from lever_plugins import catalog
from lever_plugins.schema import RecipeError, absolutise_paths, from_mapping, path_problems, suggest

TOP_LEVEL_KEYS = ("model", "datasets", "run")


def _yaml_error(path: str, exc: yaml.YAMLError) -> RecipeError:
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return RecipeError([f"{where}: malformed YAML: {problem}"])


def load_yaml(path: str) -> dict:
    """Read a YAML mapping with safe loading; errors name the file and line."""
    if not os.path.isfile(path):
        raise RecipeError([f"{path}: recipe file not found"])
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: expected a mapping at the top level, got {type(data).__name__}"])
    return data


def apply_overrides(recipe: dict, assignments: Iterable[str]) -> dict:
    """Return a copy of ``recipe`` with each ``a.b.c=value`` applied (value parsed as YAML)."""
    out = copy.deepcopy(recipe)
    problems = []
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"--set {assignment!r}: expected KEY.PATH=VALUE")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problems.append(f"--set {assignment!r}: value is not valid YAML ({getattr(exc, 'problem', exc)})")
            continue
        node = out
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"--set {assignment!r}: {'.'.join(parts[: depth + 1])} is not a mapping")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise RecipeError(problems)
    return out


def _deep_merge(base: Mapping, override: Mapping) -> dict:
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class ResolvedRecipe:
    """A validated recipe: ``data`` is the fully explicit dict, the settings objects are typed views."""

    data: dict
    model: Any
    datasets: dict
    run: Any
    source: str

    @property
    def model_spec(self) -> catalog.PluginSpec:
        return catalog.get_plugin("model", self.data["model"]["arch"])

    def output_dir(self) -> str:
        return self.data["run"]["output_dir"]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.data, sort_keys=False, default_flow_style=False)


def to_plain(cfg: Any) -> Any:
    """An OmegaConf node (as LAVIS passes configs) as plain dicts/lists; anything else unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # omegaconf comes with LAVIS; without it there are no such nodes
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def model_settings_from_config(cfg: Any) -> Any:
    """Validated settings of a model config node (what every plugin model's ``from_config`` calls)."""
    problems: list[str] = []
    settings = resolve_model_block(dict(to_plain(cfg)), problems)
    if problems:
        raise RecipeError(problems)
    return settings


def resolve_model_block(block: Mapping, problems: list[str]) -> Any:
    """Settings of a ``model:`` block: the ``model_type`` preset merged under the block's own keys.

    Used by ``resolve`` and by the model's ``from_config`` (so LAVIS's own train.py validates too).
    """
    block = dict(block)
    spec = catalog.get_plugin("model", str(block.get("arch")), where="model.arch")
    preset_path = catalog.model_config_path(spec.name, str(block.get("model_type")))
    preset = load_yaml(preset_path).get("model", {})
    return _settings_block(spec, _deep_merge(preset, block), "model", problems)


def _settings_block(spec: catalog.PluginSpec, data: Any, path: str, problems: list[str]) -> Any:
    cls = spec.settings_class()
    if cls is None:
        return data
    return from_mapping(cls, data, path, problems)


def resolve(recipe: Mapping, source: str = "<recipe>", *, check_paths: bool = False) -> ResolvedRecipe:
    """Validate ``recipe`` against every plugin schema; raise :class:`RecipeError` with all problems."""
    problems: list[str] = []
    for key in recipe:
        if key not in TOP_LEVEL_KEYS:
            problems.append(f"{key}: unknown top-level key{suggest(key, TOP_LEVEL_KEYS)}; expected {', '.join(TOP_LEVEL_KEYS)}")
    for key in TOP_LEVEL_KEYS:
        if not isinstance(recipe.get(key), Mapping):
            problems.append(f"{key}: required mapping is missing")
    if problems:
        raise RecipeError(problems, source)
    data: dict = {}

    model_settings = None
    try:
        model_settings = resolve_model_block(recipe["model"], problems)
    except RecipeError as exc:
        problems.extend(exc.problems)

    # datasets: our builders' defaults, then the recipe's keys
    data["datasets"] = {}
    dataset_settings = {}
    if not recipe["datasets"]:
        problems.append("datasets: at least one dataset is required")
    for name, block in recipe["datasets"].items():
        try:
            default_path = catalog.dataset_config_path(name)
            defaults = load_yaml(default_path).get("datasets", {}).get(name, {}) if os.path.isfile(default_path) else {}
            merged = _deep_merge(defaults, block or {})
            data["datasets"][name] = merged
            dataset_settings[name] = _settings_block(catalog.get_plugin("dataset", name), merged, f"datasets.{name}", problems)
        except RecipeError as exc:
            problems.extend(exc.problems)

    # run: validated against the task's run schema
    run_block = dict(recipe["run"])
    run_settings = None
    try:
        task_spec = catalog.get_plugin("task", str(run_block.get("task")), where="run.task")
        if "output_dir" in run_block and isinstance(run_block["output_dir"], str):
            run_block["output_dir"] = os.path.abspath(os.path.expanduser(run_block["output_dir"]))
        run_settings = _settings_block(task_spec, run_block, "run", problems)
        if run_settings is not None:
            catalog.get_plugin("runner", run_settings.runner, where="run.runner")
            if run_settings.lr_sched.startswith("lever_"):
                catalog.get_plugin("lr_scheduler", run_settings.lr_sched, where="run.lr_sched")
            data["run"] = run_settings.to_dict()
    except RecipeError as exc:
        problems.extend(exc.problems)

    for settings in (model_settings, run_settings, *dataset_settings.values()):
        if settings is not None:
            absolutise_paths(settings)
    if run_settings is not None:
        data["run"] = run_settings.to_dict()
    if model_settings is not None:
        data["model"] = model_settings.to_dict()
    for name, settings in dataset_settings.items():
        if settings is not None:
            data["datasets"][name] = settings.to_dict()
    if not problems:
        problems.extend(catalog.get_plugin("task", data["run"]["task"]).cross_block_problems(data))
    if check_paths and not problems:
        problems.extend(path_problems(model_settings, "model"))
        for name, settings in dataset_settings.items():
            found = path_problems(settings, f"datasets.{name}")
            if getattr(settings, "generate_demo", False):
                found = [p for p in found if not p.startswith(f"datasets.{name}.root:")]
            problems.extend(found)
        problems.extend(path_problems(run_settings, "run"))
    if problems:
        raise RecipeError(problems, source)
    return ResolvedRecipe(data=data, model=model_settings, datasets=dataset_settings, run=run_settings, source=source)


def load_recipe(path: str, overrides: Iterable[str] = (), *, check_paths: bool = False) -> ResolvedRecipe:
    """Load, override and resolve the recipe at ``path``."""
    raw = load_yaml(path)
    try:
        raw = apply_overrides(raw, overrides)
    except RecipeError as exc:
        raise RecipeError(exc.problems, path) from None
    return resolve(raw, source=path, check_paths=check_paths)


def read_resolved(output_dir: str) -> Optional[dict]:
    """The recipe saved by an earlier run in ``output_dir``, or None."""
    path = os.path.join(output_dir, "recipe.yaml")
    return load_yaml(path) if os.path.isfile(path) else None
