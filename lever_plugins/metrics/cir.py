"""Composed image retrieval metrics on CIRR and FashionIQ, and the CIRR test-server export.

FashionIQ (:func:`fashioniq_category_recalls`, :func:`fashioniq_metrics`) is described there.

CIRR protocol (SPEC §5):

* **Recall@K** (K = 1, 5, 10, 50) ranks the whole gallery of the split *with the query's reference
  image removed* (the reference is trivially similar to itself and is never the answer).
* **Recall_subset@K** (K = 1, 2, 3) ranks only the query's image set (``img_set.members``, six images)
  minus the reference: five candidates, the target among them.
* The headline number is ``(Recall@5 + Recall_subset@1) / 2``.

Ranks are 0-based. Ties are broken by gallery order (the earlier gallery image ranks first), exactly
as a stable descending sort orders them, so :func:`cirr_metrics` and :func:`cirr_submission` always
agree on the same similarity matrix.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
import torch

from lever_plugins.io import write_json_atomic

ArrayLike = Union[torch.Tensor, np.ndarray]

RECALL_KS = (1, 5, 10, 50)
SUBSET_RECALL_KS = (1, 2, 3)
FASHIONIQ_RECALL_KS = (10, 50)
SUBMISSION_VERSION = "rc2"


def recall_at_k(ranks: ArrayLike, k: int) -> float:
    """Percentage of queries whose target rank (0-based) is below ``k``.

    Args:
        ranks: ``(N,)`` integer ranks, 0 meaning the target came first.
        k: cut-off, >= 1.

    Returns:
        Recall@k in percent.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    ranks_t = torch.as_tensor(ranks)
    if ranks_t.numel() == 0:
        raise ValueError("recall_at_k needs at least one rank, got an empty array")
    return float((ranks_t < k).double().mean().item() * 100.0)


def _as_score_matrix(sims: ArrayLike, num_queries: int, num_gallery: int) -> torch.Tensor:
    scores = torch.as_tensor(sims)
    if scores.dim() != 2 or tuple(scores.shape) != (num_queries, num_gallery):
        raise ValueError(
            f"sims must have shape (num_queries, num_gallery) = ({num_queries}, {num_gallery}), "
            f"got {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        scores = scores.double()
    if torch.isnan(scores).any():
        raise ValueError("sims contains NaN; cannot rank the gallery")
    return scores


def _gallery_index(gallery_names: Sequence[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for position, name in enumerate(gallery_names):
        if name in index:
            raise ValueError(f"gallery name {name!r} appears twice (positions {index[name]} and {position})")
        index[name] = position
    return index


def _reference_indices(reference_names: Sequence[str], index: Mapping[str, int]) -> torch.Tensor:
    # A reference absent from the gallery has nothing to remove: -1.
    return torch.tensor([index.get(name, -1) for name in reference_names], dtype=torch.long)


def _without_reference(scores: torch.Tensor, reference_idx: torch.Tensor) -> torch.Tensor:
    """Copy of ``scores`` (N, G) with each row's reference set to -inf."""
    masked = scores.clone()
    reference_idx = reference_idx.to(scores.device)
    rows = torch.nonzero(reference_idx >= 0).squeeze(1)
    masked[rows, reference_idx[rows]] = float("-inf")
    return masked


def _member_matrix(
    group_members: Sequence[Sequence[str]],
    reference_names: Sequence[str],
    index: Mapping[str, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gallery indices of each query's candidates (members minus the reference).

    Returns:
        ``(N, M)`` long tensor of gallery indices, sorted ascending per row (ties then follow gallery
        order) and padded with 0, and a ``(N, M)`` bool mask of real candidates.
    """
    rows: list[list[int]] = []
    for query, members in enumerate(group_members):
        candidates = set()
        for name in members:
            if name == reference_names[query]:
                continue
            if name not in index:
                raise ValueError(f"query {query}: group member {name!r} is not in the gallery")
            candidates.add(index[name])
        rows.append(sorted(candidates))
    width = max((len(r) for r in rows), default=0)
    if width == 0:
        raise ValueError("every query's group has no candidate besides its reference")
    member_idx = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for query, candidates in enumerate(rows):
        member_idx[query, : len(candidates)] = torch.tensor(candidates, dtype=torch.long)
        valid[query, : len(candidates)] = True
    return member_idx, valid


def _target_ranks(scores: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target column: how many columns a stable descending sort puts
    before it (higher scores, and equal scores in earlier gallery columns)."""
    target_col = target_idx.to(scores.device).unsqueeze(1)
    target_score = scores.gather(1, target_col)
    gallery_col = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0)
    ahead = (scores > target_score) | ((scores == target_score) & (gallery_col < target_col))
    return ahead.sum(dim=1)


def _check_lengths(num_queries: int, **named: Sequence) -> None:
    for name, values in named.items():
        if len(values) != num_queries:
            raise ValueError(f"{name} has {len(values)} entries but sims has {num_queries} query rows")


def cirr_metrics(
    sims: ArrayLike,
    reference_names: Sequence[str],
    target_names: Sequence[str],
    gallery_names: Sequence[str],
    group_members: Sequence[Sequence[str]],
) -> dict[str, float]:
    """CIRR Recall@{1,5,10,50}, Recall_subset@{1,2,3} and their headline mean, in percent.

    Args:
        sims: ``(N, G)`` similarity of each query (reference + text) to each gallery image; higher
            is better. torch or numpy, any device.
        reference_names: ``N`` reference image names; each is removed from its own ranking.
        target_names: ``N`` target image names; each must be in ``gallery_names`` and differ from
            its reference.
        gallery_names: ``G`` distinct image names, the columns of ``sims``.
        group_members: ``N`` lists of image names (CIRR ``img_set.members``, reference included);
            every member other than the reference must be in the gallery, the target among them.

    Returns:
        ``recall_at1``, ``recall_at5``, ``recall_at10``, ``recall_at50``, ``recall_subset_at1``,
        ``recall_subset_at2``, ``recall_subset_at3`` and ``r5_rs1_mean`` =
        ``(recall_at5 + recall_subset_at1) / 2``.
    """
    num_queries = len(reference_names)
    _check_lengths(num_queries, target_names=target_names, group_members=group_members)
    if num_queries == 0:
        raise ValueError("cirr_metrics needs at least one query")
    scores = _as_score_matrix(sims, num_queries, len(gallery_names))
    index = _gallery_index(gallery_names)
    reference_idx = _reference_indices(reference_names, index)

    missing = [(q, t) for q, t in enumerate(target_names) if t not in index]
    if missing:
        query, name = missing[0]
        raise ValueError(
            f"{len(missing)} target(s) are not in the gallery, first: query {query} target {name!r}"
        )
    target_idx = torch.tensor([index[t] for t in target_names], dtype=torch.long)
    same = torch.nonzero(target_idx == reference_idx).squeeze(1)
    if same.numel():
        query = int(same[0])
        raise ValueError(f"query {query}: target {target_names[query]!r} is its own reference")

    device = scores.device
    target_col = target_idx.to(device).unsqueeze(1)
    masked = _without_reference(scores, reference_idx)
    target_score = masked.gather(1, target_col)
    global_ranks = _target_ranks(masked, target_idx)

    member_idx, valid = _member_matrix(group_members, reference_names, index)
    member_idx, valid = member_idx.to(device), valid.to(device)
    has_target = ((member_idx == target_col) & valid).any(dim=1)
    if not bool(has_target.all()):
        query = int(torch.nonzero(~has_target)[0])
        raise ValueError(
            f"query {query}: target {target_names[query]!r} is not among its group members "
            f"{list(group_members[query])!r}"
        )
    member_score = scores.gather(1, member_idx)
    subset_ahead = valid & (
        (member_score > target_score) | ((member_score == target_score) & (member_idx < target_col))
    )
    subset_ranks = subset_ahead.sum(dim=1)

    result = {f"recall_at{k}": recall_at_k(global_ranks, k) for k in RECALL_KS}
    result.update({f"recall_subset_at{k}": recall_at_k(subset_ranks, k) for k in SUBSET_RECALL_KS})
    result["r5_rs1_mean"] = (result["recall_at5"] + result["recall_subset_at1"]) / 2.0
    return result


def fashioniq_category_recalls(
    sims: ArrayLike, target_names: Sequence[str], gallery_names: Sequence[str]
) -> dict[str, float]:
    """FashionIQ Recall@10 and Recall@50 of one category, in percent.

    The gallery is the category's whole val image split and, as in SPRC's FashionIQ validation, the
    query's reference image is **not** removed from it (unlike CIRR): a reference that outranks the
    target costs the query one place. Ties follow gallery order (see the module docstring); SPRC's
    unstable argsort leaves them unspecified.

    Args:
        sims: ``(N, G)`` similarity of each query (reference + joined captions) to each gallery
            image; higher is better.
        target_names: ``N`` target image names, each in ``gallery_names``.
        gallery_names: ``G`` distinct image names, the columns of ``sims``.

    Returns:
        ``{"r10": ..., "r50": ...}``.
    """
    num_queries = len(target_names)
    if num_queries == 0:
        raise ValueError("fashioniq_category_recalls needs at least one query")
    scores = _as_score_matrix(sims, num_queries, len(gallery_names))
    index = _gallery_index(gallery_names)
    missing = [(q, t) for q, t in enumerate(target_names) if t not in index]
    if missing:
        query, name = missing[0]
        raise ValueError(f"{len(missing)} target(s) are not in the gallery, first: query {query} target {name!r}")
    ranks = _target_ranks(scores, torch.tensor([index[t] for t in target_names], dtype=torch.long))
    return {f"r{k}": recall_at_k(ranks, k) for k in FASHIONIQ_RECALL_KS}


def fashioniq_metrics(category_recalls: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """FashionIQ summary over categories, as SPRC reports it (percent).

    Args:
        category_recalls: ``{category: {"r10": ..., "r50": ...}}`` from
            :func:`fashioniq_category_recalls`, in the order to report.

    Returns:
        ``<category>_r10`` and ``<category>_r50`` per category, ``average_r10`` and ``average_r50``
        (means over the categories) and ``average_recall`` = ``(average_r10 + average_r50) / 2``,
        which equals the mean over categories of ``(R@10 + R@50) / 2`` (SPRC's headline).
    """
    if not category_recalls:
        raise ValueError("fashioniq_metrics needs at least one category")
    result: dict[str, float] = {}
    for category, recalls in category_recalls.items():
        for k in FASHIONIQ_RECALL_KS:
            result[f"{category}_r{k}"] = float(recalls[f"r{k}"])
    count = len(category_recalls)
    for k in FASHIONIQ_RECALL_KS:
        result[f"average_r{k}"] = sum(float(r[f"r{k}"]) for r in category_recalls.values()) / count
    result["average_recall"] = (result["average_r10"] + result["average_r50"]) / 2.0
    return result


def cirr_submission(
    sims: ArrayLike,
    pair_ids: Sequence[int],
    reference_names: Sequence[str],
    gallery_names: Sequence[str],
    group_members: Sequence[Sequence[str]],
    *,
    top_k: int = 50,
    subset_top_k: int = 3,
) -> tuple[dict, dict]:
    """The two JSON objects the CIRR test server expects.

    Args:
        sims: ``(N, G)`` query-to-gallery similarities, higher is better.
        pair_ids: ``N`` CIRR ``pairid`` values (distinct).
        reference_names: ``N`` reference names, excluded from both rankings.
        gallery_names: ``G`` distinct gallery names (columns of ``sims``).
        group_members: ``N`` member lists; the subset ranking uses members minus the reference.
        top_k: names kept per query in the ``recall`` file (server: 50).
        subset_top_k: names kept per query in the ``recall_subset`` file (server: 3).

    Returns:
        ``(recall, recall_subset)``: ``{"version": "rc2", "metric": "recall", "<pairid>": [top_k
        names]}`` and ``{"version": "rc2", "metric": "recall_subset", "<pairid>": [subset_top_k
        names]}``.
    """
    num_queries = len(pair_ids)
    _check_lengths(num_queries, reference_names=reference_names, group_members=group_members)
    if len({int(p) for p in pair_ids}) != num_queries:
        raise ValueError("pair_ids must be distinct (each pairid is one key of the submission)")
    scores = _as_score_matrix(sims, num_queries, len(gallery_names))
    index = _gallery_index(gallery_names)
    reference_idx = _reference_indices(reference_names, index)
    names = np.asarray(list(gallery_names), dtype=object)

    masked = _without_reference(scores, reference_idx)
    keep = min(top_k + 1, masked.shape[1])  # one extra: the reference may sort inside the cut
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :keep].cpu().numpy()
    recall: dict = {"version": SUBMISSION_VERSION, "metric": "recall"}
    for query, pair_id in enumerate(pair_ids):
        reference = int(reference_idx[query])
        ranked = [names[j] for j in order[query] if j != reference]
        recall[str(int(pair_id))] = ranked[:top_k]

    member_idx, valid = _member_matrix(group_members, reference_names, index)
    member_idx, valid = member_idx.to(scores.device), valid.to(scores.device)
    member_score = scores.gather(1, member_idx)
    by_score = torch.sort(member_score, dim=1, descending=True, stable=True).indices
    # Second stable sort moves padding behind every real candidate, keeping the score order.
    valid_sorted = valid.gather(1, by_score)
    by_validity = torch.sort((~valid_sorted).to(torch.uint8), dim=1, stable=True).indices
    member_order = member_idx.gather(1, by_score.gather(1, by_validity)).cpu().numpy()
    counts = valid.sum(dim=1).cpu().numpy()
    recall_subset: dict = {"version": SUBMISSION_VERSION, "metric": "recall_subset"}
    for query, pair_id in enumerate(pair_ids):
        count = min(int(counts[query]), subset_top_k)
        recall_subset[str(int(pair_id))] = [names[j] for j in member_order[query, :count]]
    return recall, recall_subset


def write_cirr_submission(
    out_dir: Union[str, os.PathLike],
    sims: ArrayLike,
    pair_ids: Sequence[int],
    reference_names: Sequence[str],
    gallery_names: Sequence[str],
    group_members: Sequence[Sequence[str]],
    *,
    name: str = "test1",
) -> tuple[Path, Path]:
    """Write ``recall_submission_<name>.json`` and ``recall_subset_submission_<name>.json``.

    Each file is written to a temporary file in ``out_dir`` and moved into place with
    ``os.replace``, so a crash never leaves a half-written submission.

    Args:
        out_dir: directory, created if missing.
        sims, pair_ids, reference_names, gallery_names, group_members: as :func:`cirr_submission`.
        name: suffix of the file names.

    Returns:
        The paths of the recall and the recall_subset file.
    """
    recall, recall_subset = cirr_submission(sims, pair_ids, reference_names, gallery_names, group_members)
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    recall_path = directory / f"recall_submission_{name}.json"
    subset_path = directory / f"recall_subset_submission_{name}.json"
    write_json_atomic(recall_path, recall)
    write_json_atomic(subset_path, recall_subset)
    return recall_path, subset_path
