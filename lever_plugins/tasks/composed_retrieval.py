"""``lever_composed_retrieval``: train a CIR model and evaluate it the CIRR way.

Validation ranks each split's whole gallery for every (reference, text) query with the reference
image removed (Recall@1/5/10/50) and, within the query's ``img_set`` minus the reference, computes
Recall_subset@1/2/3; ``agg_metrics`` is ``(R@5 + R_subset@1) / 2`` and picks the best checkpoint on
``val``. ``test1`` (no targets) is exported as the two CIRR test-server JSON files.

Under torch.distributed each rank computes the features of its share of the gallery and the queries;
the shares are gathered on every rank before scoring, so multi-process metrics equal the single-process
ones (tested with 2 CPU processes).
"""
from __future__ import annotations

import json
import logging
import os

import torch
from torch.utils.data import DataLoader, Subset

from lever_plugins.metrics.cir import cirr_metrics, write_cirr_submission
from lever_plugins.runners import distributed as lever_dist
from lever_plugins.schemas.cir import ComposedRetrievalRunSettings
from lever_plugins.tasks.base import LeverTask, model_device

logger = logging.getLogger(__name__)

QUERY_CHUNK = 256  # queries scored against the gallery at once (bounds the (q, g, Q) similarity tensor)


def _progress(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


class ComposedRetrievalTask(LeverTask):
    settings_cls = ComposedRetrievalRunSettings

    @torch.no_grad()
    def evaluation(self, model, data_loader, cuda_enabled=True):
        """Features of the split's gallery and queries, each rank computing its share, gathered on every rank."""
        model = getattr(model, "module", model)
        device = model_device(model)
        dataset = data_loader.dataset
        gallery = dataset.gallery
        show = lever_dist.is_main_process() and (self.settings is None or self.settings.progress_bar)

        def shard_loader(source):
            return DataLoader(Subset(source, lever_dist.shard_indices(len(source))), batch_size=data_loader.batch_size or 32,
                              collate_fn=source.collater, num_workers=data_loader.num_workers)

        gallery_rows = []
        for batch in _progress(shard_loader(gallery), f"gallery {dataset.split}", show):
            feats = model.target_features(batch["image"].to(device)).float().cpu()
            gallery_rows.extend(zip(feats.unbind(0), batch["image_name"]))
        gallery_rows = lever_dist.gather_sharded(gallery_rows)

        query_rows = []
        for batch in _progress(shard_loader(dataset), f"queries {dataset.split}", show):
            feats = model.fusion_features(batch["reference_image"].to(device), batch["text_input"]).float().cpu()
            targets = batch.get("target_name", [None] * len(batch["reference_name"]))
            query_rows.extend(zip(feats.unbind(0), (int(p) for p in batch["pair_id"]), batch["reference_name"], targets))
        query_rows = lever_dist.gather_sharded(query_rows)

        target_feats = torch.stack([row[0] for row in gallery_rows])
        query_feats = torch.stack([row[0] for row in query_rows])
        pair_ids = [row[1] for row in query_rows]
        sims = torch.cat([model.similarity(chunk, target_feats) for chunk in query_feats.split(QUERY_CHUNK)])
        members = {t.pair_id: list(t.group_members) for t in dataset.triplets}
        return {
            "split": dataset.split,
            "sims": sims,
            "pair_ids": pair_ids,
            "reference_names": [row[2] for row in query_rows],
            "target_names": [row[3] for row in query_rows],
            "gallery_names": [row[1] for row in gallery_rows],
            "group_members": [members[p] for p in pair_ids],
        }

    def after_training(self, runner) -> None:
        count = self.settings.save_gate_maps if self.settings is not None else 0
        if not count:
            return
        model = runner.unwrap_dist_model(runner.model)
        if getattr(model, "gated_fusion", None) is None:
            logger.warning("run.save_gate_maps=%d but model.use_gated_fusion is false: no gate maps", count)
            return
        from lever_plugins.launch import save_gate_maps_for_run

        split = "val" if "val" in runner.dataloaders else next(iter(runner.dataloaders))
        paths = save_gate_maps_for_run(str(runner.output_dir), split=split, num_queries=count)
        logger.info("saved %d gate maps to %s", len(paths), os.path.dirname(str(paths[0])) if paths else "-")

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        if not lever_dist.is_main_process():
            return {"agg_metrics": 0.0}
        from lavis.common.registry import registry

        result_dir = registry.get_path("result_dir")
        if any(t is None for t in val_result["target_names"]):
            paths = write_cirr_submission(
                result_dir, val_result["sims"], val_result["pair_ids"], val_result["reference_names"],
                val_result["gallery_names"], val_result["group_members"], name=f"{split_name}_epoch{epoch}",
            )
            logger.info("wrote CIRR test-server files: %s", ", ".join(str(p) for p in paths))
            return {"agg_metrics": 0.0, "submission": str(paths[0])}
        metrics = cirr_metrics(
            val_result["sims"], val_result["reference_names"], val_result["target_names"],
            val_result["gallery_names"], val_result["group_members"],
        )
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["agg_metrics"] = metrics["r5_rs1_mean"]
        with open(os.path.join(result_dir, f"{split_name}_epoch{epoch}_metrics.json"), "w", encoding="utf-8") as handle:
            json.dump(metrics, handle, indent=2)
        return metrics
