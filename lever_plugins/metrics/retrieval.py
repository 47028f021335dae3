"""Image-text retrieval metrics: i2t / t2i Recall@K and rSum (Flickr30K, MS-COCO 1K and 5K).

Protocol (SPEC §6): ``sims[i, j]`` scores image ``i`` against caption ``j``; ``txt2img[j]`` is the
image of caption ``j`` (five captions per image in Flickr30K and COCO).

* **i2t** (image query): rank of the *best-ranked* of the image's own captions among all captions.
* **t2i** (caption query): rank of the caption's image among all images.
* **R@K** is the percentage of queries whose rank (0-based) is below K; ``rsum`` the sum of the six.
* **COCO 1K** is the mean over 5 folds of 1,000 consecutive images, each with its own captions;
  **COCO 5K** is :func:`retrieval_metrics` on the whole test set.

Ties count against the query: a candidate that scores *equal* to the ground truth ranks ahead of it,
so a constant similarity matrix gets no credit (R@1 = 0 unless there is a single candidate).

Inputs may be torch tensors or numpy arrays; no torch import here (cheap to import).
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np

__all__ = ["retrieval_metrics", "coco_1k_5fold_metrics", "RECALL_KS"]

RECALL_KS = (1, 5, 10)
# Rows of the similarity matrix compared at once (bounds the temporary boolean matrix).
_ROW_CHUNK = 256


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as error:  # pragma: no cover - exotic inputs
        raise ValueError(f"{name} must be an array or tensor, got {type(x).__name__}") from error


def _check(sims: Any, txt2img: Any) -> tuple[np.ndarray, np.ndarray]:
    sims_np = _to_numpy(sims, "sims")
    if sims_np.ndim != 2 or 0 in sims_np.shape:
        raise ValueError(f"sims must be a non-empty (N_img, N_txt) matrix, got shape {sims_np.shape}")
    sims_np = sims_np.astype(np.float64, copy=False)
    if not np.isfinite(sims_np).all():
        bad = np.argwhere(~np.isfinite(sims_np))[0]
        raise ValueError(f"sims has a non-finite value at [{bad[0]}, {bad[1]}]: {sims_np[tuple(bad)]}")
    ids = _to_numpy(txt2img, "txt2img")
    n_img, n_txt = sims_np.shape
    if ids.ndim != 1 or ids.shape[0] != n_txt:
        raise ValueError(f"txt2img must be (N_txt,) = ({n_txt},) for sims of shape {sims_np.shape}, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        if not np.all(np.equal(np.mod(ids, 1), 0)):
            raise ValueError("txt2img must hold integer image indices")
        ids = ids.astype(np.int64)
    if ids.min() < 0 or ids.max() >= n_img:
        j = int(np.argmax((ids < 0) | (ids >= n_img)))
        raise ValueError(f"txt2img[{j}] = {ids[j]} is not an image index in 0..{n_img - 1}")
    orphans = np.setdiff1d(np.arange(n_img), ids)
    if orphans.size:
        raise ValueError(
            f"image {orphans[0]} has no caption in txt2img ({orphans.size} such images); i2t recall is undefined for it"
        )
    return sims_np, ids.astype(np.int64)


def _i2t_ranks(sims: np.ndarray, txt2img: np.ndarray) -> np.ndarray:
    """0-based rank of each image's best own caption (ties against it)."""
    n_img = sims.shape[0]
    ranks = np.empty(n_img, dtype=np.int64)
    for start in range(0, n_img, _ROW_CHUNK):
        rows = sims[start : start + _ROW_CHUNK]
        own = txt2img[None, :] == np.arange(start, start + rows.shape[0])[:, None]
        best_own = np.where(own, rows, -np.inf).max(axis=1)
        ranks[start : start + rows.shape[0]] = ((rows >= best_own[:, None]) & ~own).sum(axis=1)
    return ranks


def _t2i_ranks(sims: np.ndarray, txt2img: np.ndarray) -> np.ndarray:
    """0-based rank of each caption's image among all images (ties against it)."""
    n_txt = sims.shape[1]
    ranks = np.empty(n_txt, dtype=np.int64)
    for start in range(0, n_txt, _ROW_CHUNK):
        cols = sims[:, start : start + _ROW_CHUNK]
        gt = txt2img[start : start + cols.shape[1]]
        truth = cols[gt, np.arange(cols.shape[1])]
        ranks[start : start + cols.shape[1]] = (cols >= truth[None, :]).sum(axis=0) - 1
    return ranks


def retrieval_metrics(sims: Any, txt2img: Any) -> Dict[str, float]:
    """i2t and t2i Recall@1/5/10 and rSum, in percent.

    Args:
        sims: ``(N_img, N_txt)`` similarities (torch tensor or numpy array).
        txt2img: ``(N_txt,)`` image index of each caption; every image needs at least one caption.

    Returns:
        ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}``.

    Raises:
        ValueError: shapes that do not match, indices out of range, an image without captions, NaN/inf.
    """
    sims_np, ids = _check(sims, txt2img)
    i2t, t2i = _i2t_ranks(sims_np, ids), _t2i_ranks(sims_np, ids)
    out: Dict[str, float] = {}
    for prefix, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in RECALL_KS:
            out[f"{prefix}_r{k}"] = float(100.0 * np.mean(ranks < k))
    out["rsum"] = float(sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in RECALL_KS))
    return out


def coco_1k_5fold_metrics(sims: Any, txt2img: Any, n_folds: int = 5) -> Dict[str, float]:
    """COCO 1K protocol: :func:`retrieval_metrics` averaged over contiguous folds of images.

    The images are split into ``n_folds`` equal contiguous folds (5 x 1,000 for COCO 5K); each fold
    keeps the captions of its images and ranks only within the fold. Every metric, ``rsum`` included,
    is the mean over the folds.

    Args:
        sims: ``(N_img, N_txt)`` similarities; ``N_img`` divisible by ``n_folds``.
        txt2img: ``(N_txt,)`` image index of each caption.
        n_folds: number of folds.

    Returns:
        Same keys as :func:`retrieval_metrics`.
    """
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 1:
        raise ValueError(f"n_folds must be a positive integer, got {n_folds!r}")
    sims_np, ids = _check(sims, txt2img)
    n_img = sims_np.shape[0]
    if n_img % n_folds:
        raise ValueError(f"{n_img} images cannot be split into {n_folds} equal folds")
    fold_size = n_img // n_folds
    folds = []
    for fold in range(n_folds):
        low, high = fold * fold_size, (fold + 1) * fold_size
        captions = np.flatnonzero((ids >= low) & (ids < high))
        folds.append(retrieval_metrics(sims_np[low:high][:, captions], ids[captions] - low))
    return {key: float(np.mean([f[key] for f in folds])) for key in folds[0]}
