"""Ranking metrics for demonstration selection: step top-k accuracy, MRR, NDCG@k.

Conventions (one place for all callers):

* ``scores (N, K)``: higher is better; ``-inf`` marks a candidate that cannot be chosen (e.g. one
  already selected at an earlier step) and ranks last. NaN is rejected.
* **Ties count against the target**: the target's 0-based rank is the number of *other*
  candidates scoring at least as high. A model that scores everything equally therefore gets
  top-1 accuracy 0, not 100.
* :func:`topk_accuracy` is in **percent** (0-100), :func:`mrr` and :func:`ndcg_at_k` are
  **fractions** (0-1), matching how the seeds report them (Top-1 72.5 %, MRR 0.785, NDCG@6 0.821).

Inputs may be numpy arrays or torch tensors (any device); computation is numpy float64.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np

__all__ = ["target_ranks", "topk_accuracy", "mrr", "ndcg_at_k", "pointer_selection_metrics"]


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _scores_and_target(scores: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _to_numpy(scores).astype(np.float64)
    t = _to_numpy(target)
    if s.ndim != 2 or s.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty (N, K) array, got shape {s.shape}")
    if t.shape != (s.shape[0],):
        raise ValueError(f"target must have shape (N,) = ({s.shape[0]},), got {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"target must hold integer candidate indices, got dtype {t.dtype}")
    if (t < 0).any() or (t >= s.shape[1]).any():
        raise ValueError(f"target indices must lie in [0, {s.shape[1]}), got [{t.min()}, {t.max()}]")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s, t.astype(np.int64)


def target_ranks(scores: Any, target: Any) -> np.ndarray:
    """0-based rank of each target: how many other candidates score at least as high.

    Args:
        scores: ``(N, K)``.
        target: ``(N,)`` int indices.

    Returns:
        ``(N,)`` int64.
    """
    s, t = _scores_and_target(scores, target)
    target_score = s[np.arange(len(t)), t][:, None]
    return (s >= target_score).sum(1).astype(np.int64) - 1


def topk_accuracy(scores: Any, target: Any, k: int) -> float:
    """Percentage of rows whose target is among the ``k`` best-scored candidates.

    Args:
        scores: ``(N, K)``.
        target: ``(N,)``.
        k: cut-off, >= 1.

    Returns:
        Accuracy in percent.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return float((target_ranks(scores, target) < k).mean() * 100.0)


def mrr(scores: Any, target: Any) -> float:
    """Mean reciprocal rank ``mean(1 / (rank + 1))`` as a fraction in (0, 1]."""
    return float((1.0 / (target_ranks(scores, target) + 1)).mean())


def ndcg_at_k(scores: Any, relevance: Any, k: int) -> float:
    """Mean NDCG@k with linear gains: ``DCG = sum_{i<k} rel_(i) / log2(i + 2)``, divided by the ideal DCG.

    Candidates are ranked by descending score; equal scores keep their column order (stable sort),
    ``-inf`` ranks last. Rows without any positive relevance have no ideal ranking and are left out
    of the mean; if every row is like that the result is NaN.

    Args:
        scores: ``(N, K)``.
        relevance: ``(N, K)`` non-negative graded relevance.
        k: cut-off, >= 1.

    Returns:
        NDCG@k as a fraction in [0, 1].
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    s = _to_numpy(scores).astype(np.float64)
    rel = _to_numpy(relevance).astype(np.float64)
    if s.ndim != 2 or s.shape[0] == 0 or rel.shape != s.shape:
        raise ValueError(f"scores and relevance must be non-empty (N, K) of one shape, got {s.shape} and {rel.shape}")
    if np.isnan(s).any() or np.isnan(rel).any():
        raise ValueError("scores or relevance contain NaN")
    if (rel < 0).any():
        raise ValueError("relevance must be non-negative")
    cut = min(int(k), s.shape[1])
    discounts = 1.0 / np.log2(np.arange(cut) + 2.0)
    order = np.argsort(-s, axis=1, kind="stable")[:, :cut]
    dcg = (np.take_along_axis(rel, order, axis=1) * discounts).sum(1)
    ideal = (-np.sort(-rel, axis=1)[:, :cut] * discounts).sum(1)
    keep = ideal > 0
    if not keep.any():
        return float("nan")
    return float((dcg[keep] / ideal[keep]).mean())


def pointer_selection_metrics(
    logits: Any, labels: Any, ks: Sequence[int] = (1, 3, 5), ndcg_k: int = 6
) -> Dict[str, float]:
    """Selector metrics from teacher-forced pointer logits (SPEC §7).

    * ``top{k}``: step top-k accuracy (percent) over all ``B * S`` steps, the step's label as target
      and already-chosen candidates (``-inf``) ranked last.
    * ``mrr``: mean reciprocal rank of the step label, over all steps.
    * ``ndcg@{ndcg_k}``: ranking of the whole pool by the first step's scores against graded
      relevance ``S - s`` for ``labels[:, s]`` (the beam's best-first order), 0 elsewhere.

    Args:
        logits: ``(B, S, K)``.
        labels: ``(B, S)``.

    Returns:
        ``{"top1": ..., "top3": ..., "top5": ..., "mrr": ..., "ndcg@6": ...}``.
    """
    lg = _to_numpy(logits).astype(np.float64)
    lab = _to_numpy(labels)
    if lg.ndim != 3 or lab.shape != lg.shape[:2]:
        raise ValueError(f"logits must be (B, S, K) and labels (B, S), got {lg.shape} and {lab.shape}")
    batch, steps, k = lg.shape
    flat_scores, flat_labels = lg.reshape(batch * steps, k), lab.reshape(-1)
    out = {f"top{kk}": topk_accuracy(flat_scores, flat_labels, kk) for kk in ks}
    out["mrr"] = mrr(flat_scores, flat_labels)
    relevance = np.zeros((batch, k))
    np.put_along_axis(relevance, lab.astype(np.int64), np.arange(steps, 0, -1, dtype=np.float64)[None, :], axis=1)
    out[f"ndcg@{ndcg_k}"] = ndcg_at_k(lg[:, 0, :], relevance, ndcg_k)
    return out
