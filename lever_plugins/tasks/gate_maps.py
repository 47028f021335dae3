"""Gate maps of a CIR model with the gated-fusion plugin, drawn from a model in memory.

Used after training (on the best model the runner holds) and by ``lever-plugins gate-maps RUN_DIR``
(which builds the model from the run's recipe and loads its checkpoint strictly).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from lever_plugins.datasets.files import load_image
from lever_plugins.run_dir import RECIPE_FILE
from lever_plugins.schema import RecipeError
from lever_plugins.visualize import save_gate_maps

DISPLAY_MIN = 224  # small demo images are drawn larger so the patch grid is visible


def _picture(dataset: Any, name: str, size: int):
    return load_image(dataset.image_paths[name], "gate maps", ValueError).convert("RGB").resize((size, size))


@torch.no_grad()
def draw_gate_maps(model: Any, dataset: Any, count: int, out_dir: os.PathLike) -> list[Path]:
    """Panels for the first ``count`` queries of ``dataset`` (reference with its gate, target, text) and
    their grid, under ``out_dir``. ``model`` needs ``gate_maps`` (``lever_blip2_cir`` with the plugin)."""
    if getattr(model, "gated_fusion", None) is None:
        raise ValueError("gate maps need model.use_gated_fusion: true")
    items = [dataset[i] for i in range(min(count, len(dataset)))]
    if not items:
        return []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        gates = model.gate_maps(torch.stack([item["reference_image"] for item in items]).to(device),
                                [item["text_input"] for item in items]).float().cpu()
    finally:
        model.train(was_training)
    vision = model.settings.vision
    size = max(vision.image_size, DISPLAY_MIN)
    grid = vision.image_size // vision.patch_size
    targets = [_picture(dataset, item["target_name"], size) if item.get("target_name") else None for item in items]
    return save_gate_maps(
        gates, [_picture(dataset, item["reference_name"], size) for item in items],
        [item["text_input"] for item in items],
        [f"{item['pair_id']}_{item['text_input'][:40].replace(' ', '_')}" for item in items], out_dir,
        targets=targets if any(t is not None for t in targets) else None, grid_size=(grid, grid), has_cls=True,
        alpha=float(model.gated_fusion.alpha),
    )


def save_gate_maps_for_run(
    run_dir: str, *, checkpoint: Optional[str] = None, split: str = "val", num_queries: int = 8,
    out_dir: Optional[str] = None,
) -> list:
    """Gate maps of a trained gated-fusion run: its recipe's model with the checkpoint loaded strictly."""
    from lever_plugins.recipes import load_recipe

    run_dir = os.path.abspath(run_dir)
    recipe_path = os.path.join(run_dir, RECIPE_FILE)
    if not os.path.isfile(recipe_path):
        raise RecipeError([f"{run_dir}: no {RECIPE_FILE}; expected the output dir of a lever-plugins run"])
    resolved = load_recipe(recipe_path)
    if not resolved.data["model"].get("use_gated_fusion"):
        raise RecipeError([f"{recipe_path}: model.use_gated_fusion is false; there is no gate to draw"])
    checkpoint = checkpoint or os.path.join(run_dir, "checkpoint_best.pth")
    if not os.path.isfile(checkpoint):
        raise RecipeError([f"checkpoint not found: {checkpoint}"])
    import lever_plugins.registry  # noqa: F401
    from lever_plugins.datasets.builders import build_eval_split
    from lever_plugins.models.blip2_cir import Blip2CirModel

    # the model's own strict loader: every weight present (frozen ones from `pretrained`), none foreign
    model = Blip2CirModel.from_config({**resolved.data["model"], "finetuned": checkpoint})
    dataset_name, dataset_block = next(iter(resolved.data["datasets"].items()))
    dataset = build_eval_split(dataset_name, dataset_block, split)
    return draw_gate_maps(model, dataset, num_queries, out_dir or os.path.join(run_dir, "gate_maps"))
