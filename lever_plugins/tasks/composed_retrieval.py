"""``lever_composed_retrieval``: train a CIR model and evaluate it the CIRR or the FashionIQ way.

Validation ranks each split's whole gallery for every (reference, text) query with the reference
image removed (Recall@1/5/10/50) and, within the query's ``img_set`` minus the reference, computes
Recall_subset@1/2/3; ``agg_metrics`` is ``(R@5 + R_subset@1) / 2`` and picks the best checkpoint on
``val``. ``test1`` (no targets) is exported as the two CIRR test-server JSON files.

FashionIQ (``lever_fashioniq``, a val dataset with one gallery per category in ``.galleries``): each
category's queries rank that category's val images (reference not removed, as in SPRC), R@10/R@50 per
category (``dress_r10`` ...), their means, and ``agg_metrics`` = ``average_recall`` = mean over
categories of (R@10 + R@50) / 2.

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

from lever_plugins.metrics.cir import cirr_metrics, fashioniq_category_recalls, fashioniq_metrics, write_cirr_submission
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
        """Features of the split's gallery and queries, each rank computing its share, gathered on every rank.

        A dataset with ``.galleries`` (FashionIQ) is scored per category: each category's queries
        against that category's own gallery.
        """
        model = getattr(model, "module", model)
        device = model_device(model)
        dataset = data_loader.dataset
        show = lever_dist.is_main_process() and (self.settings is None or self.settings.progress_bar)

        def sharded_rows(source, desc, encode):
            """``encode(batch)`` rows of this rank's share of ``source``, gathered from every rank in order."""
            loader = DataLoader(Subset(source, lever_dist.shard_indices(len(source))), batch_size=data_loader.batch_size or 32,
                                collate_fn=getattr(source, "collater", dataset.collater), num_workers=data_loader.num_workers)
            rows = []
            for batch in _progress(loader, desc, show):
                rows.extend(encode(batch))
            return lever_dist.gather_sharded(rows)

        def gallery_rows(batch):
            feats = model.target_features(batch["image"].to(device)).float().cpu()
            return zip(feats.unbind(0), batch["image_name"])

        def query_rows(batch):
            feats = model.fusion_features(batch["reference_image"].to(device), batch["text_input"]).float().cpu()
            targets = batch.get("target_name", [None] * len(batch["reference_name"]))
            return zip(feats.unbind(0), (int(p) for p in batch["pair_id"]), batch["reference_name"], targets)

        def similarities(query_rows_, gallery_rows_):
            target_feats = torch.stack([row[0] for row in gallery_rows_])
            query_feats = torch.stack([row[0] for row in query_rows_])
            return torch.cat([model.similarity(chunk, target_feats) for chunk in query_feats.split(QUERY_CHUNK)])

        if getattr(dataset, "galleries", None) is not None:  # FashionIQ: one gallery per category
            categories = {}
            for category, gallery in dataset.galleries.items():
                gallery_part = sharded_rows(gallery, f"gallery {dataset.split} {category}", gallery_rows)
                queries = Subset(dataset, dataset.category_indices(category))
                query_part = sharded_rows(queries, f"queries {dataset.split} {category}", query_rows)
                categories[category] = {
                    "sims": similarities(query_part, gallery_part),
                    "reference_names": [row[2] for row in query_part],
                    "target_names": [row[3] for row in query_part],
                    "gallery_names": [row[1] for row in gallery_part],
                }
            return {"split": dataset.split, "categories": categories}

        gallery_part = sharded_rows(dataset.gallery, f"gallery {dataset.split}", gallery_rows)
        query_part = sharded_rows(dataset, f"queries {dataset.split}", query_rows)
        pair_ids = [row[1] for row in query_part]
        members = {t.pair_id: list(t.group_members) for t in dataset.triplets}
        return {
            "split": dataset.split,
            "sims": similarities(query_part, gallery_part),
            "pair_ids": pair_ids,
            "reference_names": [row[2] for row in query_part],
            "target_names": [row[3] for row in query_part],
            "gallery_names": [row[1] for row in gallery_part],
            "group_members": [members[p] for p in pair_ids],
        }

    def after_training(self, runner) -> None:
        model = runner.unwrap_dist_model(runner.model)
        if getattr(model, "gated_fusion", None) is not None and lever_dist.is_main_process():
            self._plot_gate_opening(runner.output_dir)
        count = self.settings.save_gate_maps if self.settings is not None else 0
        if not count:
            return
        if getattr(model, "gated_fusion", None) is None:
            logger.warning("run.save_gate_maps=%d but model.use_gated_fusion is false: no gate maps", count)
            return
        from lever_plugins.tasks.gate_maps import draw_gate_maps

        split = "val" if "val" in runner.dataloaders else next(iter(runner.dataloaders))
        if os.path.isfile(os.path.join(str(runner.output_dir), "checkpoint_best.pth")):
            model = runner.best_model()  # the model in memory, with the best epoch's weights
        out_dir = os.path.join(str(runner.output_dir), "gate_maps")
        paths = draw_gate_maps(model, runner.dataloaders[split].dataset, count, out_dir)
        logger.info("saved %d gate maps and their grid to %s", max(len(paths) - 1, 0), out_dir)

    @staticmethod
    def _plot_gate_opening(output_dir) -> None:
        from lever_plugins.plots import plot_gate_opening

        metrics_path = os.path.join(str(output_dir), "metrics.jsonl")
        if not os.path.isfile(metrics_path):
            return
        try:
            path = plot_gate_opening(metrics_path, os.path.join(str(output_dir), "gate_opening.png"))
        except ImportError as error:  # matplotlib is optional in an existing LAVIS environment
            logger.warning("no gate_opening.png: %s (pip install matplotlib)", error)
            return
        if path is not None:
            logger.info("gate opening per epoch: %s", path)

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        if not lever_dist.is_main_process():
            return {"agg_metrics": 0.0}
        from lavis.common.registry import registry

        result_dir = registry.get_path("result_dir")
        if "categories" in val_result:  # FashionIQ: R@10/R@50 per category and their averages
            metrics = fashioniq_metrics({
                category: fashioniq_category_recalls(part["sims"], part["target_names"], part["gallery_names"])
                for category, part in val_result["categories"].items()
            })
            metrics["agg_metrics"] = metrics["average_recall"]
            self._write_metrics(result_dir, split_name, epoch, metrics)
            return metrics
        if any(t is None for t in val_result["target_names"]):
            paths = write_cirr_submission(
                result_dir, val_result["sims"], val_result["pair_ids"], val_result["reference_names"],
                val_result["gallery_names"], val_result["group_members"], name=f"{split_name}_epoch{epoch}",
            )
            logger.info("wrote CIRR test-server files: %s", ", ".join(str(p) for p in paths))
            # no labels, so no metric (a 0.0 here read like a failed run)
            return {"submission": ", ".join(str(p) for p in paths)}
        metrics = cirr_metrics(
            val_result["sims"], val_result["reference_names"], val_result["target_names"],
            val_result["gallery_names"], val_result["group_members"],
        )
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["agg_metrics"] = metrics["r5_rs1_mean"]
        self._write_metrics(result_dir, split_name, epoch, metrics)
        return metrics

    @staticmethod
    def _write_metrics(result_dir, split_name, epoch, metrics) -> None:
        with open(os.path.join(result_dir, f"{split_name}_epoch{epoch}_metrics.json"), "w", encoding="utf-8") as handle:
            json.dump(metrics, handle, indent=2)
