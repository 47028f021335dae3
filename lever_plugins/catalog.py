"""The plugin catalogue: every LAVIS name we register, what it is, and the settings it reads.

Pure data, importable without torch or LAVIS: ``lever-plugins list`` / ``validate`` read it, and
``lever_plugins.registry`` imports each ``target`` and registers it into LAVIS.

Other packages add rows through the entry-point group ``lever_plugins.plugins`` (:data:`ENTRY_POINT_GROUP`):
each entry point names a list of :class:`PluginSpec` (or a function returning one) in a module that is
pure data (no torch, no LAVIS: ``list`` and ``validate`` import it), e.g. in ``pyproject.toml``::

    [project.entry-points."lever_plugins.plugins"]
    acme = "acme_lever.plugins:PLUGINS"

Their presets live under each row's ``config_root`` (``models/<arch>_<model_type>.yaml``,
``datasets/<name>.yaml``). A broken entry point or row is reported as one line naming the distribution
and the entry point (:func:`plugin_load_errors`) and skipped; everything else keeps working.
"""
from __future__ import annotations

import importlib
import os
import typing
from dataclasses import dataclass, field, replace
from typing import Literal, Optional

from lever_plugins.schema import RecipeError, suggest

CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
ENTRY_POINT_GROUP = "lever_plugins.plugins"

Kind = Literal["model", "task", "dataset", "runner", "lr_scheduler"]
KINDS: tuple[str, ...] = typing.get_args(Kind)


@dataclass(frozen=True)
class PluginSpec:
    kind: Kind
    name: str  # the LAVIS registry name (all start with ``lever_``)
    target: str  # "module:attribute" of the class to register
    purpose: str
    settings: Optional[str] = None  # "module:Class" of the settings dataclass (recipe schema)
    recipe_block: str = ""  # where in a recipe the settings live
    model_types: tuple[str, ...] = field(default=())  # for models: presets under configs/models/
    # for models: the presets that build on a CPU in seconds from no files (demos use them; the plugin
    # contract test, tests/test_plugin_contract.py, builds, trains and reloads each)
    tiny_model_types: tuple[str, ...] = field(default=())
    # for tasks: "module:function" taking the resolved recipe dict, returning problems between blocks
    cross_check: Optional[str] = None
    # "module:function" taking the resolved recipe dict, returning the --dry-run plan lines of this plugin
    # (what it attaches where, parameter counts); pure Python, nothing is built
    describe: Optional[str] = None
    # folder holding this row's presets: models/<arch>_<model_type>.yaml, datasets/<name>.yaml
    # (None: lever_plugins/configs; plugin packages set an absolute path inside their package)
    config_root: Optional[str] = None
    # "" for ours; set on loading a plugin package's row: "<distribution> <version>, entry point <name> = <value>"
    origin: str = ""

    @property
    def presets_root(self) -> str:
        return self.config_root or CONFIG_ROOT

    def load(self):
        module_name, attribute = self.target.split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def cross_block_problems(self, data: dict) -> list[str]:
        if self.cross_check is None:
            return []
        module_name, attribute = self.cross_check.split(":")
        return list(getattr(importlib.import_module(module_name), attribute)(data))

    def plan_lines(self, data: dict) -> list[str]:
        if self.describe is None:
            return []
        module_name, attribute = self.describe.split(":")
        return list(getattr(importlib.import_module(module_name), attribute)(data))

    def settings_class(self) -> Optional[type]:
        if self.settings is None:
            return None
        module_name, attribute = self.settings.split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def settings_class_or_problem(self) -> tuple[Optional[type], Optional[str]]:
        """``(settings class, None)``, or for a plugin package whose settings do not import ``(None, why)``
        (ours must import: their failure is a bug and raises)."""
        try:
            return self.settings_class(), None
        except Exception as exc:
            if not self.origin:
                raise
            return None, (f"plugin package {self.origin}: {self.kind} {self.name!r}: settings {self.settings} "
                          f"do not import ({type(exc).__name__}: {exc})")


PLUGINS: tuple[PluginSpec, ...] = (
    PluginSpec(
        kind="model",
        name="lever_blip2_cir",
        target="lever_plugins.models.blip2_cir:Blip2CirModel",
        purpose="BLIP-2 Q-Former composed image retrieval (SPRC-style) with optional GatedFusionModule",
        settings="lever_plugins.schemas.cir:Blip2CirSettings",
        recipe_block="model",
        model_types=("tiny", "pretrain"),
        tiny_model_types=("tiny",),
        describe="lever_plugins.schemas.cir:describe_plan",
    ),
    PluginSpec(
        kind="dataset",
        name="lever_cirr",
        target="lever_plugins.datasets.builders:CirrBuilder",
        purpose="CIRR triplets + split galleries from the released layout (or the generated shapes demo)",
        settings="lever_plugins.schemas.cir:CirrDatasetSettings",
        recipe_block="datasets.lever_cirr",
    ),
    PluginSpec(
        kind="dataset",
        name="lever_fashioniq",
        target="lever_plugins.datasets.builders:FashionIQBuilder",
        purpose="FashionIQ dress/shirt/toptee triplets (captions joined as SPRC) + per-category val galleries",
        settings="lever_plugins.schemas.cir:FashionIQDatasetSettings",
        recipe_block="datasets.lever_fashioniq",
    ),
    PluginSpec(
        kind="task",
        name="lever_composed_retrieval",
        target="lever_plugins.tasks.composed_retrieval:ComposedRetrievalTask",
        purpose="train with itc+rtc+align; validate CIRR Recall@K / Recall_subset@K (export test1 submissions) or FashionIQ R@10/R@50 per category",
        settings="lever_plugins.schemas.cir:ComposedRetrievalRunSettings",
        recipe_block="run",
        cross_check="lever_plugins.schemas.cir:cross_block_problems",
    ),
    PluginSpec(
        kind="runner",
        name="lever_runner",
        target="lever_plugins.runners.runner:LeverRunner",
        purpose="LAVIS RunnerBase that also works on CPU and torchrun/gloo, resumes, logs CSV/JSONL",
        recipe_block="run.runner",
    ),
    PluginSpec(
        kind="lr_scheduler",
        name="lever_onecycle_lr",
        target="lever_plugins.runners.schedulers:OneCycleLRScheduler",
        purpose="torch's OneCycleLR, stepped once per optimiser step (SPRC's schedule; run.onecycle_*, run.lr_horizon_epochs)",
        recipe_block="run.lr_sched",
    ),
    PluginSpec(
        kind="lr_scheduler",
        name="lever_multistep_lr",
        target="lever_plugins.runners.schedulers:MultiStepLRScheduler",
        purpose="lr x lr_gamma at each epoch in lr_milestones (LAPS's schedule)",
        recipe_block="run.lr_sched",
    ),
    PluginSpec(
        kind="model",
        name="lever_blip2_seps",
        target="lever_plugins.models.blip2_seps:Blip2SepsModel",
        purpose="BLIP-2 image-text retrieval with the SEPS head (CrossSparseAggrNet + SEPSLoss) on ViT patch and Q-Former word tokens",
        settings="lever_plugins.schemas.seps_retrieval:Blip2SepsSettings",
        recipe_block="model",
        model_types=("tiny", "pretrain"),
        tiny_model_types=("tiny",),
        describe="lever_plugins.schemas.seps_retrieval:describe_plan",
    ),
    PluginSpec(
        kind="dataset",
        name="lever_flickr30k",
        target="lever_plugins.datasets.retrieval_builders:Flickr30kRetrievalBuilder",
        purpose="Flickr30K Karpathy splits in LAVIS's annotation format + one dense caption per image (or the generated demo)",
        settings="lever_plugins.schemas.seps_retrieval:RetrievalDatasetSettings",
        recipe_block="datasets.lever_flickr30k",
    ),
    PluginSpec(
        kind="dataset",
        name="lever_coco",
        target="lever_plugins.datasets.retrieval_builders:CocoRetrievalBuilder",
        purpose="MS-COCO Karpathy splits in LAVIS's annotation format + dense captions; evaluated 5K and 1K (folds)",
        settings="lever_plugins.schemas.seps_retrieval:CocoRetrievalDatasetSettings",
        recipe_block="datasets.lever_coco",
    ),
    PluginSpec(
        kind="task",
        name="lever_seps_retrieval",
        target="lever_plugins.tasks.seps_retrieval:SepsRetrievalTask",
        purpose="train with SEPSLoss (+ ITC), hard negatives after warm-up; i2t/t2i R@1/5/10 + rSum, all pairs or ITC re-ranking",
        settings="lever_plugins.schemas.seps_retrieval:SepsRetrievalRunSettings",
        recipe_block="run",
        cross_check="lever_plugins.schemas.seps_retrieval:cross_block_problems",
    ),
    PluginSpec(
        kind="model",
        name="lever_pointer_selector",
        target="lever_plugins.models.pointer_selector:PointerSelectorModel",
        purpose="pointer selectors V1/V2/V3 choosing in-context demonstrations from a candidate pool (SPEC §7)",
        settings="lever_plugins.schemas.icl:PointerSelectorSettings",
        recipe_block="model",
        model_types=("v1", "v2", "v3"),
        tiny_model_types=("v1", "v2", "v3"),
        describe="lever_plugins.schemas.pointer:describe_plan",
    ),
    PluginSpec(
        kind="dataset",
        name="lever_vqa_icl",
        target="lever_plugins.icl.builder:VqaIclBuilder",
        purpose="VQAv2 / OK-VQA questions + annotations with beam-search files and cached features (or the generated demo)",
        settings="lever_plugins.schemas.icl:VqaIclDatasetSettings",
        recipe_block="datasets.lever_vqa_icl",
    ),
    PluginSpec(
        kind="dataset",
        name="lever_coco_caption_icl",
        target="lever_plugins.icl.builder:CocoCaptionIclBuilder",
        purpose="COCO captions (Karpathy dataset_coco.json + images) for ICD selection scored by CIDEr, with beam-search files and cached features (or the generated demo)",
        settings="lever_plugins.schemas.icl:CocoCaptionIclDatasetSettings",
        recipe_block="datasets.lever_coco_caption_icl",
    ),
    PluginSpec(
        kind="task",
        name="lever_icl_selection",
        target="lever_plugins.tasks.icl_selection:IclSelectionTask",
        purpose="ICD selection pipeline: embed -> beam search (VLM scorer) -> train selector -> select -> VQA accuracy (captioning: CIDEr) vs zero-shot/random/RICES",
        settings="lever_plugins.schemas.icl:IclSelectionRunSettings",
        recipe_block="run",
        cross_check="lever_plugins.icl.plan:cross_block_problems",
        describe="lever_plugins.icl.plan:describe_icl_plan",
    ),
)


# ---------------------------------------------------------------------------------- plugin packages
_external: Optional[tuple[PluginSpec, ...]] = None
_load_errors: list[str] = []


def _entry_point_label(entry_point) -> str:
    dist = getattr(entry_point, "dist", None)
    package = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
    return f"{package}, entry point {entry_point.name} = {entry_point.value}"


def _row_problems(spec: PluginSpec, taken: dict) -> list[str]:
    """Why a plugin package's row cannot be used (empty: it can)."""
    problems = []
    if spec.kind not in KINDS:
        problems.append(f"kind {spec.kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(spec.name, str) or not spec.name:
        problems.append("name must be a non-empty string")
    elif spec.name.startswith("lever_"):
        problems.append("the prefix 'lever_' is reserved for lever-plugins' own plugins")
    elif (spec.kind, spec.name) in taken:
        problems.append(f"{spec.kind} name {spec.name!r} is already taken by {taken[(spec.kind, spec.name)]}")
    for label, value in (("target", spec.target), ("settings", spec.settings), ("cross_check", spec.cross_check)):
        if value is not None and (not isinstance(value, str) or value.count(":") != 1):
            problems.append(f"{label} must be 'module:attribute', got {value!r}")
    if spec.target is None:
        problems.append("target is required")
    if not set(spec.tiny_model_types) <= set(spec.model_types):
        problems.append(f"tiny_model_types {list(spec.tiny_model_types)} must be among model_types {list(spec.model_types)}")
    if spec.model_types or spec.kind == "dataset":
        root = spec.config_root
        if root is None or not os.path.isabs(root):
            if spec.model_types:
                problems.append("config_root must be the absolute path of the folder holding models/<arch>_<model_type>.yaml")
            elif root is not None:
                problems.append(f"config_root must be an absolute path, got {root!r}")
        else:
            for model_type in spec.model_types:
                preset = os.path.join(root, "models", f"{spec.name}_{model_type}.yaml")
                if not os.path.isfile(preset):
                    problems.append(f"model_type {model_type!r}: preset not found: {preset}")
    return problems


def _load_external() -> tuple[tuple[PluginSpec, ...], list[str]]:
    from importlib import metadata

    rows: list[PluginSpec] = []
    errors: list[str] = []
    taken = {(p.kind, p.name): "lever-plugins itself" for p in PLUGINS}
    try:
        entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception as exc:  # a malformed entry_points.txt somewhere on sys.path
        return (), [f"plugin packages: cannot read entry points of group {ENTRY_POINT_GROUP} ({type(exc).__name__}: {exc})"]
    seen = set()
    for entry_point in sorted(entry_points, key=lambda ep: (getattr(ep.dist, "name", "") or "", ep.name)):
        label = _entry_point_label(entry_point)
        if label in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(label)
        try:
            value = entry_point.load()
            if callable(value) and not isinstance(value, (list, tuple)):
                value = value()
        except Exception as exc:
            errors.append(f"plugin package {label}: cannot load it ({type(exc).__name__}: {exc})")
            continue
        if not isinstance(value, (list, tuple)) or not all(isinstance(row, PluginSpec) for row in value):
            got = type(value).__name__ if not isinstance(value, (list, tuple)) else (
                "a list holding " + ", ".join(sorted({type(r).__name__ for r in value if not isinstance(r, PluginSpec)})))
            errors.append(f"plugin package {label}: expected a list of lever_plugins.catalog.PluginSpec "
                          f"(or a function returning one), got {got}")
            continue
        for row in value:
            problems = _row_problems(row, taken)
            if problems:
                errors.append(f"plugin package {label}: {row.kind} {row.name!r} skipped: {'; '.join(problems)}")
                continue
            row = replace(row, origin=label)
            taken[(row.kind, row.name)] = label
            rows.append(row)
    return tuple(rows), errors


def external_plugins() -> tuple[PluginSpec, ...]:
    """Rows from installed plugin packages (entry points, loaded once; nothing imports torch or LAVIS)."""
    global _external
    if _external is None:
        _external, errors = _load_external()
        _load_errors[:] = errors
    return _external


def plugin_load_errors() -> list[str]:
    """One line per plugin package entry point or row that could not be used."""
    external_plugins()
    return list(_load_errors)


def all_plugins() -> tuple[PluginSpec, ...]:
    """Ours, then the plugin packages'."""
    return PLUGINS + external_plugins()


def plugins(kind: Optional[str] = None) -> list[PluginSpec]:
    return [p for p in all_plugins() if kind is None or p.kind == kind]


def get_plugin(kind: str, name: str, *, where: str = "") -> PluginSpec:
    """The spec of ``name``; a :class:`RecipeError` with the known names and a did-you-mean otherwise."""
    for spec in PLUGINS:  # ours first: a built-in name never reads the entry points
        if spec.kind == kind and spec.name == name:
            return spec
    known = [p.name for p in plugins(kind)]
    for spec in plugins(kind):
        if spec.name == name:
            return spec
    location = f"{where}: " if where else ""
    raise RecipeError([f"{location}unknown {kind} {name!r}{suggest(name, known)}; known: {', '.join(known)}",
                       *plugin_load_errors()])


def model_config_path(arch: str, model_type: str) -> str:
    """Absolute path of the default YAML of ``arch`` at preset ``model_type``."""
    spec = get_plugin("model", arch, where="model.arch")
    if model_type not in spec.model_types:
        raise RecipeError(
            [f"model.model_type: unknown preset {model_type!r} for {arch}{suggest(model_type, spec.model_types)}; "
             f"known: {', '.join(spec.model_types)}"]
        )
    return preset_config_paths(spec.name)[model_type]


def preset_config_paths(arch: str) -> dict[str, str]:
    """``{model_type: absolute YAML path}`` for a model's LAVIS ``PRETRAINED_MODEL_CONFIG_DICT``."""
    spec = get_plugin("model", arch)
    return {name: os.path.join(spec.presets_root, "models", f"{arch}_{name}.yaml") for name in spec.model_types}


def dataset_config_path(name: str) -> str:
    spec = get_plugin("dataset", name, where=f"datasets.{name}")
    return os.path.join(spec.presets_root, "datasets", f"{name}.yaml")
