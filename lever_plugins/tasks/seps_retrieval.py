"""``lever_seps_retrieval``: train ``lever_blip2_seps`` and evaluate image-text retrieval (Flickr30K, COCO).

Training: LAVIS's loop via :class:`~lever_plugins.tasks.base.LeverTask` (every scalar the model returns
is averaged per epoch and logged: ``loss_align``, ``loss_ratio``, ``loss_itc``, ``keep_ratio``...).
Hard negatives (``SEPSLoss.max_violation``) are switched on from epoch ``run.warmup_epochs``.

Evaluation of a val/test split: every image is encoded once (head tokens + ITC query features), every
dense caption once per image, every caption once. Then either

* ``run.eval_mode: all_pairs``: the head scores every (image, caption) pair, a block of
  ``run.eval_image_block`` images against all captions per call; or
* ``run.eval_mode: rerank``: BLIP-2's ITC score picks each image's top ``k_test`` captions and each
  caption's top ``k_test`` images; the head re-scores exactly those pairs (one head call per image,
  covering the captions it is a candidate for in either direction) and every other pair ranks below
  them, as LAVIS ``compute_sim_matrix`` does with its ITM head.

Metrics (:mod:`lever_plugins.metrics.retrieval`): ``i2t_r1/5/10``, ``t2i_r1/5/10``, ``rsum`` over the
split (Flickr30K 1K test; COCO: the 5K protocol), the same for BLIP-2's ITC alone as ``itc_*`` (the
baseline on the same data), and for COCO the 1K protocol (mean over folds of ``fold_images``) as
``1k_*`` / ``1k_itc_*``. ``agg_metrics`` = ``rsum``; the runner keeps the best checkpoint on ``val``
only. After training, ``loss_curves.png`` is drawn from ``metrics.jsonl``.

Under torch.distributed every rank encodes the whole split (images, dense captions, captions: one pass
each) and computes the ITC scores; the head, which dominates the cost, is sharded: each rank scores its
share of the images (all-pairs blocks, or the re-rank candidates of its images) and the scores are
gathered, so multi-process metrics equal the single-process ones (tested with 2 processes).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from lever_plugins.metrics.retrieval import RECALL_KS, coco_1k_5fold_metrics, retrieval_metrics
from lever_plugins.runners import distributed as lever_dist
from lever_plugins.schemas.seps_retrieval import SepsRetrievalRunSettings
from lever_plugins.tasks.base import LeverTask, model_device

logger = logging.getLogger(__name__)

TEXT_BATCH = 256  # captions encoded at once
ITC_IMAGE_BLOCK = 64  # images per ITC block (bounds the (v, t, Q) tensor)
ScoreFn = Callable[[int, torch.Tensor], torch.Tensor]


def _progress(iterable: Iterable, desc: str, enabled: bool, total: Optional[int] = None) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, total=total)


def pad_cat(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``(B_i, L_i, C)`` blocks along dim 0, zero-padding dim 1 to the longest."""
    longest = max(block.shape[1] for block in blocks)
    return torch.cat([F.pad(block, (0, 0, 0, longest - block.shape[1])) for block in blocks])


def rerank_candidates(itc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(V, T)`` boolean masks of each image's top-``k`` ITC captions and each caption's top-``k`` images."""
    num_images, num_captions = itc.shape
    itc = itc.float().cpu()
    candidate_i2t = torch.zeros(num_images, num_captions, dtype=torch.bool)
    candidate_i2t.scatter_(1, itc.topk(min(k, num_captions), dim=1).indices, True)
    candidate_t2i = torch.zeros(num_images, num_captions, dtype=torch.bool)
    candidate_t2i.scatter_(0, itc.topk(min(k, num_images), dim=0).indices, True)
    return candidate_i2t, candidate_t2i


def rerank_similarities(itc: torch.Tensor, k: int, score_fn: ScoreFn, show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-score BLIP-2's top-``k`` ITC candidates with ``score_fn`` in both directions.

    Args:
        itc: ``(V, T)`` ITC scores.
        k: candidates per query (image query: captions; caption query: images).
        score_fn: ``score_fn(v, captions (n,) long) -> (n,)`` scores of image ``v`` with those captions.
        show_progress: tqdm over the images.

    Returns:
        ``(i2t, t2i)``, each ``(V, T)`` float32 on CPU: the re-scored candidates of image queries
        (rows) and of caption queries (columns); every non-candidate gets the same score, lower than
        any candidate's, so it ranks behind them (and ties count against the ground truth).
    """
    num_images, num_captions = itc.shape
    candidate_i2t, candidate_t2i = rerank_candidates(itc, k)
    needed = candidate_i2t | candidate_t2i
    scores = torch.full((num_images, num_captions), float("nan"))
    for image in _progress(range(num_images), "re-rank", show_progress, total=num_images):
        captions = needed[image].nonzero().squeeze(1)
        scores[image, captions] = score_fn(image, captions).float().cpu()
    floor = scores[needed].min() - 1.0
    return torch.where(candidate_i2t, scores, floor), torch.where(candidate_t2i, scores, floor)


def directional_metrics(i2t_sims: Any, t2i_sims: Any, txt2img: Any) -> dict[str, float]:
    """i2t metrics from ``i2t_sims``, t2i metrics from ``t2i_sims`` (``(N_img, N_txt)`` each), and their rsum."""
    i2t = retrieval_metrics(i2t_sims, txt2img)
    t2i = i2t if t2i_sims is i2t_sims else retrieval_metrics(t2i_sims, txt2img)
    out = {f"i2t_r{k}": i2t[f"i2t_r{k}"] for k in RECALL_KS}
    out.update({f"t2i_r{k}": t2i[f"t2i_r{k}"] for k in RECALL_KS})
    out["rsum"] = float(sum(out.values()))
    return out


def _fold_slices(num_images: int, fold_images: Optional[int], txt2img: torch.Tensor) -> list[tuple[slice, torch.Tensor]]:
    """COCO 1K folds: ``(image slice, caption indices)`` per fold; [] when the split does not divide."""
    if not fold_images or num_images % fold_images or num_images < fold_images:
        return []
    out = []
    for start in range(0, num_images, fold_images):
        captions = ((txt2img >= start) & (txt2img < start + fold_images)).nonzero().squeeze(1)
        out.append((slice(start, start + fold_images), captions))
    return out


class SepsRetrievalTask(LeverTask):
    settings_cls = SepsRetrievalRunSettings

    def on_train_epoch_start(self, model: torch.nn.Module, epoch: int) -> None:
        warmup = self.settings.warmup_epochs if self.settings is not None else None
        loss = getattr(model, "seps_loss", None)
        if warmup is None or loss is None:
            return
        hard = epoch >= warmup
        if hard != loss.max_violation:
            logger.info("epoch %d: SEPSLoss max_violation -> %s (run.warmup_epochs=%d)", epoch, hard, warmup)
        loss.set_max_violation(hard)

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluation(self, model, data_loader, cuda_enabled=True):
        model = getattr(model, "module", model)
        device = model_device(model)
        dataset = data_loader.dataset
        settings = self.settings if self.settings is not None else SepsRetrievalRunSettings(task="lever_seps_retrieval", output_dir=".")
        show = lever_dist.is_main_process() and settings.progress_bar

        image_tokens, image_itc = [], []
        for batch in _progress(data_loader, f"images {dataset.split}", show):
            encoded = model.encode_images(batch["image"].to(device))
            image_tokens.append(encoded.embeddings.float().cpu())
            image_itc.append(encoded.itc.float())
        image_tokens_all = torch.cat(image_tokens)  # CPU: moved to the device one block at a time
        image_itc_all = torch.cat(image_itc)

        def encode(texts: Sequence[str], encoder: Callable, desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            embeddings, lengths, itc = [], [], []
            for start in _progress(range(0, len(texts), TEXT_BATCH), desc, show):
                out = encoder(texts[start : start + TEXT_BATCH])
                embeddings.append(out.embeddings.float())
                lengths.append(out.lengths)
                itc.append(out.itc.float())
            return pad_cat(embeddings), torch.cat(lengths), torch.cat(itc)

        dense_tokens, dense_lengths, _ = encode(dataset.dense_text, model.encode_dense_texts, f"dense {dataset.split}")
        caption_tokens, caption_lengths, caption_itc = encode(dataset.text, model.encode_texts, f"captions {dataset.split}")
        txt2img = torch.as_tensor(dataset.txt2img, dtype=torch.long)

        itc = torch.cat(
            [
                model.itc_similarity(image_itc_all[start : start + ITC_IMAGE_BLOCK], caption_itc).float().cpu()
                for start in range(0, len(image_itc_all), ITC_IMAGE_BLOCK)
            ]
        )
        num_images, num_captions = itc.shape

        def head_block(images: slice, captions: Optional[torch.Tensor] = None) -> torch.Tensor:
            tokens = caption_tokens if captions is None else caption_tokens[captions.to(device)]
            lengths = caption_lengths if captions is None else caption_lengths[captions.to(device)]
            return model.head_similarity(
                image_tokens_all[images].to(device), dense_tokens[images], dense_lengths[images], tokens, lengths
            ).float().cpu()

        folds = _fold_slices(num_images, dataset.fold_images, txt2img) if dataset.protocol == "coco" else []
        if dataset.protocol == "coco" and not folds:
            logger.warning(
                "%s: %d images do not divide into folds of %s: no COCO 1K metrics", dataset.split, num_images, dataset.fold_images
            )
        result: dict[str, Any] = {"split": dataset.split, "txt2img": txt2img, "itc": itc, "folds": folds, "mode": settings.eval_mode}
        if settings.eval_mode == "all_pairs":
            block = settings.eval_image_block
            starts = list(range(0, num_images, block))
            mine = [starts[i] for i in lever_dist.shard_indices(len(starts))]  # this rank's image blocks
            blocks = [head_block(slice(s, s + block)) for s in _progress(mine, f"all pairs {dataset.split}", show, len(mine))]
            result["sims"] = torch.cat(lever_dist.gather_sharded(blocks))
            return result

        # Every pair any re-ranking needs (the split's and each fold's candidates), scored once: each rank
        # scores its share of the images (a pair's head score does not depend on the rest of the call),
        # and every rank receives all the scores.
        needed = torch.zeros(num_images, num_captions, dtype=torch.bool)
        for images, captions in [(slice(0, num_images), torch.arange(num_captions)), *folds]:
            fold_i2t, fold_t2i = rerank_candidates(itc[images][:, captions], settings.k_test)
            rows = needed[images]
            rows[:, captions] |= fold_i2t | fold_t2i
        scored = []
        mine = lever_dist.shard_indices(num_images)
        for image in _progress(mine, f"re-rank {dataset.split}", show, len(mine)):
            captions = needed[image].nonzero().squeeze(1)
            values = head_block(slice(image, image + 1), captions)[0] if len(captions) else torch.zeros(0)
            scored.append((image, captions, values))
        memo = torch.full((num_images, num_captions), float("nan"))
        for image, captions, values in lever_dist.gather_sharded(scored):
            memo[image, captions] = values

        def score(image: int, captions: torch.Tensor) -> torch.Tensor:
            return memo[image, captions]

        result["i2t"], result["t2i"] = rerank_similarities(itc, settings.k_test, score)
        result["fold_sims"] = []
        for images, captions in folds:
            offset = images.start

            def fold_score(image: int, local: torch.Tensor, offset: int = offset, captions: torch.Tensor = captions) -> torch.Tensor:
                return score(offset + image, captions[local])

            result["fold_sims"].append(rerank_similarities(itc[images][:, captions], settings.k_test, fold_score))
        return result

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        if not lever_dist.is_main_process():
            return {"agg_metrics": 0.0}
        metrics = retrieval_report(val_result)
        metrics["agg_metrics"] = metrics["rsum"]
        from lavis.common.registry import registry

        result_dir = registry.get_path("result_dir")
        if result_dir:
            path = os.path.join(result_dir, f"{split_name}_epoch{epoch}_metrics.json")
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(metrics, handle, indent=2)
        return metrics

    # ------------------------------------------------------------------------------ figures
    def after_training(self, runner) -> None:
        if self.settings is not None and not self.settings.plot_loss_curves:
            return
        model = runner.unwrap_dist_model(runner.model)
        target = getattr(getattr(model, "seps_loss", None), "target_ratio", None)
        metrics_path = Path(runner.output_dir) / "metrics.jsonl"
        if not metrics_path.is_file():
            return
        try:
            path = plot_loss_curves(metrics_path, Path(runner.output_dir) / "loss_curves.png", target_ratio=target)
        except ImportError as error:  # matplotlib is optional in an existing LAVIS environment
            logger.warning("no loss_curves.png: %s (pip install matplotlib, or run.plot_loss_curves: false)", error)
            return
        if path is not None:
            logger.info("loss curves: %s", path)


def retrieval_report(result: dict) -> dict[str, float]:
    """Metrics of an :meth:`SepsRetrievalTask.evaluation` result (see the module docstring for keys)."""
    txt2img = result["txt2img"]
    if result["mode"] == "all_pairs":
        metrics = directional_metrics(result["sims"], result["sims"], txt2img)
    else:
        metrics = directional_metrics(result["i2t"], result["t2i"], txt2img)
    metrics.update({f"itc_{k}": v for k, v in retrieval_metrics(result["itc"], txt2img).items()})
    folds = result.get("folds") or []
    if folds:
        fold_metrics = []
        for index, (images, captions) in enumerate(folds):
            local_txt2img = txt2img[captions] - images.start
            if result["mode"] == "all_pairs":
                sims = result["sims"][images][:, captions]
                fold_metrics.append(directional_metrics(sims, sims, local_txt2img))
            else:
                fold_metrics.append(directional_metrics(*result["fold_sims"][index], local_txt2img))
        for key in fold_metrics[0]:
            metrics[f"1k_{key}"] = float(sum(m[key] for m in fold_metrics) / len(fold_metrics))
        itc_1k = coco_1k_5fold_metrics(result["itc"], txt2img, n_folds=len(folds))
        metrics.update({f"1k_itc_{k}": v for k, v in itc_1k.items()})
    return metrics


def plot_loss_curves(metrics_path: os.PathLike, out_path: os.PathLike, target_ratio: Optional[float] = None) -> Optional[Path]:
    """Draw per-epoch training losses, keep ratios and validation rSum from a run's ``metrics.jsonl``.

    Panels: losses (total, SEPS, align, ITC), the ratio term, actual keep ratios (with the target
    ``rho`` if given), validation ``rsum`` (head and ITC). Written atomically as a PNG; returns its
    path, or None when there is no training record yet.
    """
    from lever_plugins.plots import Panel, epoch_records, plot_panels

    train, val = epoch_records(metrics_path, "train"), epoch_records(metrics_path, "val")
    if not train:
        return None
    target = {f"target {target_ratio:g}": target_ratio} if target_ratio is not None else {}
    # the SEPS hinge sum and ITC / the ratio term differ by orders of magnitude: log scales when positive
    return plot_panels([
        Panel("training losses", train, ("loss", "loss_seps", "loss_align", "loss_itc"), log_scale=True),
        Panel("ratio term", train, ("loss_ratio",), log_scale=True),
        Panel("actual keep ratio", train, ("keep_ratio", "keep_ratio_dense"), reference_lines=target),
        Panel("validation rSum", val, ("rsum", "itc_rsum")),
    ], out_path)
