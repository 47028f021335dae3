"""Dry-run description of a ``lever_icl_selection`` recipe (pure Python: nothing is imported or built)."""
from __future__ import annotations

import os
from typing import Any, Mapping

from lever_plugins.icl.kinds import CAPTION, TASK_KINDS
from lever_plugins.schemas.icl import ICL_DATASETS, STAGES, template_problems

DATASET_NAME = "lever_vqa_icl"


def icl_dataset(data: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """``(name, block)`` of the recipe's ICD-selection dataset (``lever_vqa_icl`` and ``{}`` when it names none)."""
    datasets = data.get("datasets") or {}
    for name in ICL_DATASETS:
        if name in datasets:
            return name, datasets[name] or {}
    return DATASET_NAME, {}


def dataset_problems(data: Mapping[str, Any]) -> list[str]:
    """The dataset block against ``run:``: one ICD-selection dataset, whose task kind the templates and features fit."""
    names = list(data.get("datasets") or {})
    if [n for n in names if n in ICL_DATASETS] != names or len(names) != 1:
        return [f"datasets: task lever_icl_selection reads exactly one dataset, one of {', '.join(ICL_DATASETS)}; got {names}"]
    name, _ = icl_dataset(data)
    kind = TASK_KINDS[ICL_DATASETS[name].task_kind]
    vlm, embed = data["run"]["vlm"], data["run"]["embed"]
    problems = [f"run.vlm.{p} (the {kind.label} templates of datasets.{name})"
                for p in template_problems(vlm["kind"], vlm["icd_template"], vlm["query_template"], kind.name)]
    if kind is CAPTION:
        if embed["encoder"] != "blip2" or embed["modality"] == "text":
            problems.append(f"run.embed: captioning queries are images without text; use encoder blip2 with modality "
                            f"image or multimodal (got {embed['encoder']} {embed['modality']})")
        if vlm["kind"] == "qwen2_5_vl" and not vlm["use_images"]:
            problems.append("run.vlm.use_images: captioning needs the images (a caption query has no text)")
    return problems


def selector_problems(model: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    """A selector's pool size ``K`` and ``shot_num`` against the ``run:`` block (plain dicts of both)."""
    problems = []
    pool_size = run["beam_search"]["pool_size"]
    if model["K"] != pool_size:
        problems.append(f"model.K: {model['K']} must equal run.beam_search.pool_size ({pool_size}), the candidates per query")
    shots = max(run["evaluation"]["shots"])
    if "pointer" in run["evaluation"]["methods"] and shots > model["shot_num"]:
        problems.append(f"model.shot_num: {model['shot_num']} is fewer than the {shots} shots run.evaluation.shots asks for")
    return problems


def cross_block_problems(data: dict) -> list[str]:
    """Problems between the ``model:``, ``datasets:`` and ``run:`` blocks of a resolved recipe (checked before
    any stage runs)."""
    model, run = data["model"], data["run"]
    problems = selector_problems(model, run) + dataset_problems(data)
    embed = run["embed"]
    if embed["encoder"] == "blip2" and model["d_model"] != embed["blip2"]["qformer"]["hidden_size"]:
        problems.append(f"model.d_model: {model['d_model']} must equal the feature width, "
                        f"run.embed.blip2.qformer.hidden_size ({embed['blip2']['qformer']['hidden_size']})")
    return problems


def describe_icl_plan(data: dict) -> list[str]:
    """Dry-run lines for a ``lever_icl_selection`` recipe: stages, what each writes, sizes (no torch)."""
    model, run = data["model"], data["run"]
    name, dataset = icl_dataset(data)
    kind = TASK_KINDS[ICL_DATASETS[name].task_kind]
    output_dir = run["output_dir"]
    beam, vlm, embed, evaluation = run["beam_search"], run["vlm"], run["embed"], run["evaluation"]
    version = model["model_type"]
    features_dir = os.path.abspath(dataset.get("features_dir") or os.path.join(output_dir, "embed"))
    beam_dir = os.path.abspath(dataset.get("beam_dir") or os.path.join(output_dir, "beam_search"))
    vlm_path = vlm["path"] or f"(the generated demo LM under datasets.{name}.root)"
    lines = [f"#   stages: {' -> '.join(s for s in STAGES if s in run['stages'])}"]
    plan = {
        "embed": f"embed: {embed['encoder']} {embed['modality']} features ({embed['pooling']} pooling) -> {features_dir}",
        "beam_search": (f"beam_search: {beam['num_queries']} queries, {beam['pool']} pools of K={beam['pool_size']}, "
                        f"beam {beam['beam_size']} (by {beam['rank_by']}), {beam['shots']} shots, score {beam['score']}, "
                        f"VLM {vlm['kind']} {vlm_path} -> {beam_dir}"),
        "train": (f"train: the {version} selector on {'every kept beam' if dataset.get('train_on', 'all') == 'all' else 'the best beam'} "
                  f"of each query (beam scores: {dataset.get('beam_score_transform', 'zscore')}), "
                  f"{run['max_epoch']} epochs; "
                  f"best checkpoint by val {run['agg_metric']}"),
        "select": (f"select: {', '.join(evaluation['methods'])} demonstrations for "
                   f"{evaluation['num_queries'] or 'all'} evaluation queries -> {os.path.join(output_dir, 'select')}"),
        "evaluate": (f"evaluate: {kind.metric_title} at shots {evaluation['shots']} + zero-shot -> "
                     f"{os.path.join(output_dir, 'evaluate')}/{kind.report_name}.{{md,csv,png}}"),
    }
    lines.extend(f"#   {plan[stage]}" for stage in STAGES if stage in run["stages"])
    lines.extend(f"#   PROBLEM: {problem}" for problem in cross_block_problems(data))
    return lines
