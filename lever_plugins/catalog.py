"""The plugin catalogue: every LAVIS name we register, what it is, and the settings it reads.

Pure data, importable without torch or LAVIS: ``lever-plugins list`` / ``validate`` read it, and
``lever_plugins.registry`` imports each ``target`` and registers it into LAVIS.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from lever_plugins.schema import RecipeError, suggest

CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

Kind = Literal["model", "task", "dataset", "runner", "lr_scheduler"]


@dataclass(frozen=True)
class PluginSpec:
    kind: Kind
    name: str  # the LAVIS registry name (all start with ``lever_``)
    target: str  # "module:attribute" of the class to register
    purpose: str
    settings: Optional[str] = None  # "module:Class" of the settings dataclass (recipe schema)
    recipe_block: str = ""  # where in a recipe the settings live
    model_types: tuple[str, ...] = field(default=())  # for models: presets under configs/models/
    # for tasks: "module:function" taking the resolved recipe dict, returning problems between blocks
    cross_check: Optional[str] = None

    def load(self):
        module_name, attribute = self.target.split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def cross_block_problems(self, data: dict) -> list[str]:
        if self.cross_check is None:
            return []
        module_name, attribute = self.cross_check.split(":")
        return list(getattr(importlib.import_module(module_name), attribute)(data))

    def settings_class(self) -> Optional[type]:
        if self.settings is None:
            return None
        module_name, attribute = self.settings.split(":")
        return getattr(importlib.import_module(module_name), attribute)


PLUGINS: tuple[PluginSpec, ...] = (
    PluginSpec(
        kind="model",
        name="lever_blip2_cir",
        target="lever_plugins.models.blip2_cir:Blip2CirModel",
        purpose="BLIP-2 Q-Former composed image retrieval (SPRC-style) with optional GatedFusionModule",
        settings="lever_plugins.schemas.cir:Blip2CirSettings",
        recipe_block="model",
        model_types=("tiny", "pretrain"),
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
    ),
    PluginSpec(
        kind="dataset",
        name="lever_vqa_icl",
        target="lever_plugins.datasets.icl_builders:VqaIclBuilder",
        purpose="VQAv2 / OK-VQA questions + annotations with beam-search files and cached features (or the generated demo)",
        settings="lever_plugins.schemas.icl:VqaIclDatasetSettings",
        recipe_block="datasets.lever_vqa_icl",
    ),
    PluginSpec(
        kind="task",
        name="lever_icl_selection",
        target="lever_plugins.tasks.icl_selection:IclSelectionTask",
        purpose="ICD selection pipeline: embed -> beam search (VLM scorer) -> train selector -> select -> VQA accuracy vs zero-shot/random/RICES",
        settings="lever_plugins.schemas.icl:IclSelectionRunSettings",
        recipe_block="run",
        cross_check="lever_plugins.icl.plan:cross_block_problems",
    ),
)


def plugins(kind: Optional[str] = None) -> list[PluginSpec]:
    return [p for p in PLUGINS if kind is None or p.kind == kind]


def get_plugin(kind: str, name: str, *, where: str = "") -> PluginSpec:
    """The spec of ``name``; a :class:`RecipeError` with the known names and a did-you-mean otherwise."""
    known = [p.name for p in plugins(kind)]
    for spec in plugins(kind):
        if spec.name == name:
            return spec
    location = f"{where}: " if where else ""
    raise RecipeError([f"{location}unknown {kind} {name!r}{suggest(name, known)}; known: {', '.join(known)}"])


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
    return {name: os.path.join(CONFIG_ROOT, "models", f"{arch}_{name}.yaml") for name in spec.model_types}


def dataset_config_path(name: str) -> str:
    get_plugin("dataset", name, where=f"datasets.{name}")
    return os.path.join(CONFIG_ROOT, "datasets", f"{name}.yaml")
