"""Recipes: load YAML (safely), apply ``--set`` overrides, validate every plugin key, resolve defaults.

A recipe is a LAVIS config (``model:``, ``datasets:``, ``run:``); ``_base_: other.yaml`` (or a list)
deep-merges other recipes under it (:func:`load_recipe_file`). Resolution merges the model preset
(``model_type``) and dataset defaults shipped in ``lever_plugins/configs`` under the recipe, validates
the result against the plugins' settings dataclasses, and returns the fully explicit recipe that ``run``
saves next to its outputs. Nothing here imports torch or LAVIS.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Tuple

import yaml

from lever_plugins import catalog
from lever_plugins.schema import RecipeError, absolutise_paths, expand_path, from_mapping, path_problems, suggest

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


BASE_KEY = "_base_"

# A key's place in a recipe: ("model", "gated_fusion", "num_heads").
KeyPath = Tuple[str, ...]


def display_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else absolute."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    return absolute if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def leaf_paths(node: Mapping, prefix: KeyPath = ()) -> list[KeyPath]:
    """Every leaf key path of a nested mapping (a value that is not a non-empty mapping is a leaf)."""
    out: list[KeyPath] = []
    for key, value in node.items():
        path = prefix + (key,)
        if isinstance(value, Mapping) and value:
            out.extend(leaf_paths(value, path))
        else:
            out.append(path)
    return out


def load_recipe_file(path: str) -> tuple[dict, dict[KeyPath, str], list[str]]:
    """Read a recipe with its ``_base_`` recipes merged under it.

    ``_base_: other.yaml`` (or a list of files, merged in order, later wins) names recipes relative to
    the file that names them; a base may have bases of its own. Mappings merge key by key, anything
    else (lists included) replaces. A cycle or a missing base is an error naming the chain of files.

    Returns:
        ``(data, sources, files)``: the merged mapping without ``_base_``, the file each leaf key came
        from (``display_path`` form), and every file read, bases first.
    """
    files: list[str] = []
    data, sources = _load_with_bases(path, (), files)
    return data, sources, files


def _load_with_bases(path: str, chain: tuple[str, ...], files: list[str]) -> tuple[dict, dict[KeyPath, str]]:
    real = os.path.realpath(path)
    shown = [display_path(p) for p in chain]
    if real in [os.path.realpath(p) for p in chain]:
        raise RecipeError([f"recipe inheritance cycle: {' -> '.join(shown + [display_path(path)])}"])
    if chain and not os.path.isfile(path):
        raise RecipeError([f"{display_path(path)}: base recipe not found (named in {BASE_KEY} of "
                           f"{' -> '.join(shown)})"])
    own = load_yaml(path)
    bases = own.pop(BASE_KEY, None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b.strip() for b in bases):
        raise RecipeError([f"{display_path(path)}: {BASE_KEY}: expected a recipe file name or a list of them, "
                           f"got {bases!r}"])
    merged: dict = {}
    sources: dict[KeyPath, str] = {}
    here = os.path.dirname(os.path.abspath(path))
    for base in bases:
        base_path = expand_path(base)
        if not os.path.isabs(base_path):
            base_path = os.path.join(here, base_path)
        base_data, base_sources = _load_with_bases(base_path, chain + (path,), files)
        merged = _deep_merge(merged, base_data)
        sources.update(base_sources)
    merged = _deep_merge(merged, own)
    label = display_path(path)
    sources.update({leaf: label for leaf in leaf_paths(own)})
    files.append(label)
    return merged, _live_sources(merged, sources)


def _live_sources(data: Mapping, sources: Mapping[KeyPath, str]) -> dict[KeyPath, str]:
    """``sources`` restricted to the leaves ``data`` still has (a later file may replace a subtree)."""
    return {leaf: sources[leaf] for leaf in leaf_paths(data) if leaf in sources}


def annotated_yaml(data: Mapping, sources: Mapping[KeyPath, str]) -> str:
    """``data`` as block YAML with a comment naming the source of every leaf that has one.

    Loads back to ``data`` (the comments are only comments).
    """
    lines: list[str] = []
    _annotate(data, sources, (), 0, lines)
    return "\n".join(lines) + "\n"


def _annotate(node: Mapping, sources: Mapping[KeyPath, str], prefix: KeyPath, depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    for key, value in node.items():
        path = prefix + (key,)
        if isinstance(value, Mapping) and value:
            key_text = yaml.safe_dump({key: 0}, default_flow_style=False).rstrip("\n").rsplit(":", 1)[0]
            lines.append(f"{pad}{key_text}:")
            _annotate(value, sources, path, depth + 1, lines)
            continue
        key_text = yaml.safe_dump({key: 0}, default_flow_style=False).rstrip("\n").rsplit(":", 1)[0]
        items = value.values() if isinstance(value, Mapping) else value if isinstance(value, list) else None
        if items is not None and not any(isinstance(item, (Mapping, list)) for item in items):
            text = [f"{key_text}: {yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()}"]
        else:
            text = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False, width=1_000_000)
            text = text.rstrip("\n").split("\n")
        note = sources.get(path)
        if note and len(text) == 1:
            text[0] += f"  # {note}"
        elif note:
            lines.append(f"{pad}# {'.'.join(map(str, path))}: {note}")
        lines.extend(pad + line for line in text)


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
    # where each leaf key of ``data`` came from (recipe file, ``--set``, model preset, dataset defaults);
    # keys without an entry are schema defaults
    sources: dict = field(default_factory=dict)
    files: list = field(default_factory=list)  # the recipe files merged, bases first

    def output_dir(self) -> str:
        return self.data["run"]["output_dir"]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.data, sort_keys=False, default_flow_style=False)

    def to_annotated_yaml(self) -> str:
        """The resolved recipe with the source of each key as a comment (what ``--dry-run`` prints)."""
        files = " <- ".join(reversed(self.files)) if self.files else self.source
        header = (f"# resolved recipe: {files} (later files win)\n"
                  "# comment on each key: the file it came from (or --set); no comment: the schema default\n")
        return header + annotated_yaml(self.data, self.sources)


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


def resolve_dataset_block(name: str, block: Optional[Mapping], problems: list[str]) -> tuple[dict, Any]:
    """``(merged block, settings)`` of ``datasets.<name>``: the builder's defaults under the block's keys."""
    default_path = catalog.dataset_config_path(name)
    defaults = load_yaml(default_path).get("datasets", {}).get(name, {}) if os.path.isfile(default_path) else {}
    merged = _deep_merge(defaults, block or {})
    return merged, _settings_block(catalog.get_plugin("dataset", name), merged, f"datasets.{name}", problems)


def cross_block_problems_of_config(cfg: Any, run: Mapping) -> list[str]:
    """The run task's checks across blocks (its catalogue ``cross_check``) on a LAVIS config, whose
    ``model:`` and ``datasets:`` blocks may lack the preset and default keys (LAVIS's own ``train.py``
    never resolves a recipe); ``run`` is the validated ``run:`` block. A block's own problems come first
    (the cross-check needs valid blocks)."""
    problems: list[str] = []
    data: dict = {"run": dict(run), "datasets": {}}
    model = resolve_model_block(dict(to_plain(cfg.model_cfg)), problems)
    for name, block in (to_plain(getattr(cfg, "datasets_cfg", None)) or {}).items():
        data["datasets"][name], settings = resolve_dataset_block(name, block, problems)
        if settings is not None and dataclasses.is_dataclass(settings):
            data["datasets"][name] = settings.to_dict()
    if problems or model is None:
        return problems
    data["model"] = model.to_dict()
    return catalog.get_plugin("task", data["run"]["task"]).cross_block_problems(data)


def _settings_block(spec: catalog.PluginSpec, data: Any, path: str, problems: list[str]) -> Any:
    cls, problem = spec.settings_class_or_problem()
    if problem:
        problems.append(f"{path}: {problem}")
        return None
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
            data["datasets"][name], dataset_settings[name] = resolve_dataset_block(name, block, problems)
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
    if problems:  # (a plugin package's load error is named once, however many unknown names it explains)
        raise RecipeError(list(dict.fromkeys(problems)), source)
    return ResolvedRecipe(data=data, model=model_settings, datasets=dataset_settings, run=run_settings, source=source)


def load_recipe(path: str, overrides: Iterable[str] = (), *, check_paths: bool = False) -> ResolvedRecipe:
    """Load the recipe at ``path`` (its ``_base_`` recipes merged under it), apply overrides, resolve."""
    overrides = list(overrides)
    raw, sources, files = load_recipe_file(path)
    try:
        raw = apply_overrides(raw, overrides)
    except RecipeError as exc:
        raise RecipeError(exc.problems, path) from None
    for assignment in overrides:
        key = tuple(assignment.partition("=")[0].strip().split("."))
        sources.update({leaf: "--set" for leaf in leaf_paths(raw) if leaf[: len(key)] == key})
    resolved = resolve(raw, source=path, check_paths=check_paths)
    resolved.files = files
    resolved.sources = _resolved_sources(resolved.data, _live_sources(raw, sources))
    return resolved


def _resolved_sources(data: Mapping, sources: Mapping[KeyPath, str]) -> dict[KeyPath, str]:
    """Sources of the resolved recipe's leaves: the recipe's own, then the model preset and dataset defaults."""
    defaults: dict[KeyPath, str] = {}
    model = data.get("model", {})
    try:
        preset = catalog.model_config_path(str(model.get("arch")), str(model.get("model_type")))
        defaults.update({("model",) + leaf: f"preset {display_path(preset)}"
                         for leaf in leaf_paths(load_yaml(preset).get("model", {}))})
    except (RecipeError, KeyError):
        pass
    for name in data.get("datasets", {}):
        default_path = catalog.dataset_config_path(name)
        if os.path.isfile(default_path):
            block = load_yaml(default_path).get("datasets", {}).get(name, {}) or {}
            defaults.update({("datasets", name) + leaf: f"defaults {display_path(default_path)}" for leaf in leaf_paths(block)})
    out = {}
    for leaf in leaf_paths(data):
        note = sources.get(leaf) or defaults.get(leaf)
        if note:
            out[leaf] = note
    return out
