"""Dry-run description of a ``lever_icl_selection`` recipe (pure Python: nothing is imported or built)."""
from __future__ import annotations

import os

from lever_plugins.schemas.icl import STAGES

DATASET_NAME = "lever_vqa_icl"


def cross_block_problems(data: dict) -> list[str]:
    """Problems between the ``model:`` and ``run:`` blocks of a resolved recipe (checked before any stage runs)."""
    model, run = data["model"], data["run"]
    problems = []
    pool_size = run["beam_search"]["pool_size"]
    if model["K"] != pool_size:
        problems.append(f"model.K: {model['K']} must equal run.beam_search.pool_size ({pool_size}), the candidates per query")
    shots = max(run["evaluation"]["shots"])
    if "pointer" in run["evaluation"]["methods"] and shots > model["shot_num"]:
        problems.append(f"model.shot_num: {model['shot_num']} is fewer than the {shots} shots run.evaluation.shots asks for")
    embed = run["embed"]
    if embed["encoder"] == "blip2" and model["d_model"] != embed["blip2"]["qformer"]["hidden_size"]:
        problems.append(f"model.d_model: {model['d_model']} must equal the feature width, "
                        f"run.embed.blip2.qformer.hidden_size ({embed['blip2']['qformer']['hidden_size']})")
    return problems


def describe_icl_plan(data: dict) -> list[str]:
    """Dry-run lines for a ``lever_icl_selection`` recipe: stages, what each writes, sizes (no torch)."""
    model, run = data["model"], data["run"]
    dataset = data["datasets"].get(DATASET_NAME, {})
    output_dir = run["output_dir"]
    beam, vlm, embed, evaluation = run["beam_search"], run["vlm"], run["embed"], run["evaluation"]
    d, h, version = model["d_model"], model["hidden_dim"], model["model_type"]
    count = d * h + h + 2 * (h * h + h) + (4 * h * h + 6 * h if version == "v2" else 0)
    features_dir = os.path.abspath(dataset.get("features_dir") or os.path.join(output_dir, "embed"))
    beam_dir = os.path.abspath(dataset.get("beam_dir") or os.path.join(output_dir, "beam_search"))
    vlm_path = vlm["path"] or "(the generated demo LM under datasets.lever_vqa_icl.root)"
    lines = [f"#   stages: {' -> '.join(s for s in STAGES if s in run['stages'])}"]
    plan = {
        "embed": f"embed: {embed['encoder']} {embed['modality']} features ({embed['pooling']} pooling) -> {features_dir}",
        "beam_search": (f"beam_search: {beam['num_queries']} queries, {beam['pool']} pools of K={beam['pool_size']}, "
                        f"beam {beam['beam_size']} (by {beam['rank_by']}), {beam['shots']} shots, score {beam['score']}, "
                        f"VLM {vlm['kind']} {vlm_path} -> {beam_dir}"),
        "train": (f"train: PointerSelector{version.upper()}(d_model={d}, hidden_dim={h}, K={model['K']}, "
                  f"shot_num={model['shot_num']}) on {'every kept beam' if dataset.get('train_on', 'all') == 'all' else 'the best beam'} "
                  f"of each query (beam scores: {dataset.get('beam_score_transform', 'zscore')}), "
                  f"{run['max_epoch']} epochs: {count:,} parameters; "
                  f"best checkpoint by val {run['agg_metric']}"),
        "select": (f"select: {', '.join(evaluation['methods'])} demonstrations for "
                   f"{evaluation['num_queries'] or 'all'} evaluation queries -> {os.path.join(output_dir, 'select')}"),
        "evaluate": (f"evaluate: VQA accuracy at shots {evaluation['shots']} + zero-shot -> "
                     f"{os.path.join(output_dir, 'evaluate')}/vqa_accuracy.{{md,csv,png}}"),
    }
    lines.extend(f"#   {plan[stage]}" for stage in STAGES if stage in run["stages"])
    lines.extend(f"#   PROBLEM: {problem}" for problem in cross_block_problems(data))
    return lines
