"""``lever_icl_selection``: the ICD-selection pipeline as one LAVIS task, stage by stage.

``run.stages`` (in this order; any subset): ``embed``, ``beam_search``, ``train``, ``select``,
``evaluate``. They hook into LAVIS's own sequence (``setup_task -> build_datasets -> build_model ->
runner.train()``), so ``lever-plugins run`` and a LAVIS ``train.py`` run them alike:

* ``build_datasets``: generates the demo if asked, runs ``embed`` and ``beam_search`` (skipping
  finished work), then builds the train / val datasets from the beam file;
* the runner trains the selector (``train``); without ``train`` in the stages the runner is put in
  evaluate-only mode with no validation splits, so nothing is trained;
* after training: ``select`` with the chosen checkpoint (``run.evaluation.checkpoint``: best |
  last | a path) on the main process, then ``evaluate``. In one process both run in
  ``after_training``. Under torch.distributed the runner calls ``after_training_all_ranks`` on every
  rank first (also under LAVIS's own ``train.py``, which runs our runner), and the ranks share the
  evaluation.

Under torch.distributed ``embed``, ``beam_search`` and ``evaluate`` split their queries by
question_id over the ranks and gather (results equal the single-process ones); ``train`` is DDP.

Validation (per epoch, on ``val``): teacher-forced logits of the held-out beam-search queries ->
step Top-1/3/5 accuracy (percent), MRR and NDCG@6 over all steps (:func:`lever_plugins.metrics.
ranking.pointer_selection_metrics`), Top-1 and MRR of each step (``step1_top1``, ``step1_mrr``, ...),
and the mean ``loss``, ``ce_loss``, ``ranking_loss`` and ``logits_std``.
``agg_metrics`` (which picks ``checkpoint_best.pth``) is ``run.agg_metric``, MRR by default: it uses
the rank of the beam's demonstration at every step, so it moves before Top-1 does and is less noisy
on a small validation split.

Re-running a finished pipeline needs ``--resume`` (the output dir holds a run); finished stages are
then skipped. ``--set run.stages=[select,evaluate]`` re-evaluates without retraining.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch

from lever_plugins.checkpoints import read_torch_file
from lever_plugins.icl.data import read_json
from lever_plugins.icl.embed import MANIFEST
from lever_plugins.icl.pipeline import IclPipeline
from lever_plugins.icl.plan import selector_problems
from lever_plugins.metrics.ranking import mrr, pointer_selection_metrics, topk_accuracy
from lever_plugins.recipes import to_plain
from lever_plugins.runners import distributed as lever_dist
from lever_plugins.schema import RecipeError, from_mapping
from lever_plugins.schemas.icl import ICL_DATASETS, IclSelectionRunSettings
from lever_plugins.tasks.base import LeverTask, model_device

logger = logging.getLogger(__name__)

class IclSelectionTask(LeverTask):
    settings_cls = IclSelectionRunSettings
    settings: IclSelectionRunSettings

    def __init__(self, settings=None):
        super().__init__(settings)
        self.pipeline: Optional[IclPipeline] = None

    # ------------------------------------------------------------------------------ pipeline
    def make_pipeline(self, cfg) -> IclPipeline:
        """The :class:`IclPipeline` of this recipe (fills ``features_dir`` / ``beam_dir`` into ``cfg``)."""
        datasets_cfg = cfg.datasets_cfg
        names = list(datasets_cfg)
        if len(names) != 1 or names[0] not in ICL_DATASETS:
            raise RecipeError([f"datasets: task lever_icl_selection reads exactly one dataset, one of {', '.join(ICL_DATASETS)}; "
                               f"got {names}"])
        name = names[0]
        problems: list[str] = []
        data = from_mapping(ICL_DATASETS[name], to_plain(datasets_cfg[name]) or {}, f"datasets.{name}", problems)
        if problems:
            raise RecipeError(problems)
        output_dir = os.path.abspath(os.path.expanduser(str(cfg.run_cfg.output_dir)))
        device = None
        if lever_dist.is_initialized() and torch.cuda.is_available() and self.settings.vlm.device != "cpu":
            device = torch.device(f"cuda:{lever_dist.local_rank()}")
        pipeline = IclPipeline(
            self.settings, data, output_dir, rank=lever_dist.rank(), world_size=lever_dist.world_size(),
            barrier=lever_dist.barrier, device=device,
        )
        datasets_cfg[name]["features_dir"] = pipeline.features_dir
        datasets_cfg[name]["beam_dir"] = pipeline.beam_dir
        return pipeline

    def build_datasets(self, cfg):
        # Before any stage runs (they run here, before build_model): a K / shot_num / width mismatch found
        # after hours of beam search is no use.
        self.check_across_blocks(cfg)
        pipeline = self.pipeline = self.make_pipeline(cfg)
        stages = self.settings.stages
        pipeline.prepare_data()
        if "embed" in stages:
            pipeline.embed()
        if "beam_search" in stages:
            pipeline.beam_search()
        if "train" not in stages:
            logger.info("stage train not in run.stages: the runner only loads, nothing is trained")
            cfg.run_cfg.evaluate = True
            cfg.run_cfg.valid_splits = []
            cfg.run_cfg.test_splits = []
            return {}
        return super().build_datasets(cfg)

    def build_model(self, cfg):
        model = super().build_model(cfg)
        self._check_model(model)
        return model

    def _check_model(self, model) -> None:
        # the built model against the run (also when the stages were skipped) and the embed stage's output
        settings = model.settings
        problems = selector_problems(settings.to_dict(), self.settings.to_dict())
        manifest_path = os.path.join(self.pipeline.features_dir, MANIFEST) if self.pipeline else None
        if manifest_path and os.path.isfile(manifest_path):
            dim = read_json(manifest_path, "embed manifest").get("dim")
            if dim is not None and dim != settings.d_model:
                problems.append(f"model.d_model: {settings.d_model} must equal the feature width {dim} ({manifest_path})")
        if problems:
            raise RecipeError(problems)

    # ------------------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluation(self, model, data_loader, cuda_enabled=True):
        model = getattr(model, "module", model)
        device = model_device(model)
        logits, labels = [], []
        sums: dict[str, float] = {}
        count = 0
        for batch in data_loader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = model.selector_outputs(batch)
            logits.append(out["logits"].float().cpu())
            labels.append(batch["labels"].cpu())
            size = batch["labels"].shape[0]
            for key in ("loss", "ce_loss", "ranking_loss", "logits_std"):
                if key in out:
                    sums[key] = sums.get(key, 0.0) + float(out[key]) * size
            count += size
        if not count:
            return None
        return {"logits": torch.cat(logits), "labels": torch.cat(labels), "losses": {k: v / count for k, v in sums.items()}}

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        logits, labels = val_result["logits"], val_result["labels"]
        metrics = pointer_selection_metrics(logits, labels)
        for step in range(labels.shape[1]):  # per decoding step: later steps choose among fewer candidates
            metrics[f"step{step + 1}_top1"] = topk_accuracy(logits[:, step], labels[:, step], 1)
            metrics[f"step{step + 1}_mrr"] = mrr(logits[:, step], labels[:, step])
        metrics.update(val_result["losses"])
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["agg_metrics"] = metrics[self.settings.agg_metric]
        if lever_dist.is_main_process():
            from lavis.common.registry import registry

            result_dir = registry.get_path("result_dir")
            with open(os.path.join(result_dir, f"{split_name}_epoch{epoch}_metrics.json"), "w", encoding="utf-8") as handle:
                json.dump(metrics, handle, indent=2)
        return metrics

    # ------------------------------------------------------------------------------ select + evaluate
    def _selector_weights(self, runner) -> tuple[str, dict]:
        choice = self.settings.evaluation.checkpoint
        path = {"best": os.path.join(runner.output_dir, "checkpoint_best.pth"),
                "last": os.path.join(runner.output_dir, "checkpoint_last.pth")}.get(choice, choice)
        path = os.path.abspath(os.path.expanduser(str(path)))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"run.evaluation.checkpoint: {path} not found; train first (run.stages with train) or give a checkpoint path"
            )
        stat = os.stat(path)
        return path, {"path": path, "size": stat.st_size, "mtime": int(stat.st_mtime)}

    def after_training(self, runner) -> None:
        """Main process only (the runner's contract): select + evaluate in one process; with several,
        :meth:`after_training_all_ranks` (which the runner calls on every rank first) shares them."""
        if lever_dist.world_size() > 1:
            return
        self._select_and_evaluate(runner, shard=False)

    def after_training_all_ranks(self, runner) -> None:
        """Every rank, after training (the runner calls it before ``after_training``): with several
        processes, select on the main process, then evaluate with the queries split over the ranks."""
        if lever_dist.world_size() > 1:
            self._select_and_evaluate(runner, shard=True)

    def _select_and_evaluate(self, runner, shard: bool) -> None:
        stages = self.settings.stages
        if not ({"select", "evaluate"} & set(stages)):
            return
        if self.pipeline is None:  # pragma: no cover - build_datasets always runs first
            raise RuntimeError("lever_icl_selection: build_datasets did not run")
        if "select" in stages and lever_dist.is_main_process():
            selector, weights = None, None
            if "pointer" in self.settings.evaluation.methods:
                path, weights = self._selector_weights(runner)
                model = runner.unwrap_dist_model(runner.model)
                state = read_torch_file(path)
                model.load_state_dict(state["model"] if "model" in state else state)
                model.eval()
                selector = model.selector
                logger.info("select: pointer selector weights from %s", path)
            self.pipeline.select(selector, weights)
        if shard:
            lever_dist.barrier()  # the selections are written
        if "evaluate" in stages:
            paths = self.pipeline.evaluate(shard=shard)
            if lever_dist.is_main_process():
                logger.info("evaluate: table %s, plot %s", paths["markdown"], paths["png"])
