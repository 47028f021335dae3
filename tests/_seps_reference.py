"""Reference for the SEPS head tests and benchmark: the head's similarity computed the LAPS way, one caption at a time.

Slow (``B_t`` Python iterations, per-image work repeated per caption); it exists to check and benchmark
the chunked, vectorised forward of :class:`lever_plugins.modules.seps.CrossSparseAggrNet`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from lever_plugins.modules.seps import CrossSparseAggrNet
from lever_plugins.modules.seps_selection import minmax
from lever_plugins.modules.seps_similarity import SCAN_LEAKY_SLOPE

__all__ = ["per_caption_loop_similarity"]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def per_caption_loop_similarity(
    head: CrossSparseAggrNet,
    img_embs: torch.Tensor,
    cap_embs: torch.Tensor,
    cap_lens: torch.Tensor,
    long_cap_embs: Optional[torch.Tensor] = None,
    long_cap_lens: Optional[torch.Tensor] = None,
    keep: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """The head's similarity, one caption at a time, with gathers of the kept patches.

    Image self-saliency and the dense-caption relevance are computed once (LAPS computes the saliency
    before its loop); then, for every caption, selection and aggregation run again over all images:
    score predictors, selection, gather of the kept patches, aggregation MLP on them, both branches,
    as the public LAPS/SEPS code does.

    Args:
        keep: None = each pair keeps its ``head.settings.num_keep`` best-scoring patches (the head in eval mode);
            else ``(D_s, D_d)``, ``(B_t, B_v, N)`` 0/1 masks of the patches each pair keeps in the sparse
            and dense branch (``D_d`` None without dense captions): the head in training mode keeps the
            patches its returned decisions mark.

    Returns:
        ``(B_v, B_t)`` similarities.
    """
    cap_lens, long_cap_lens = head._check_inputs(img_embs, cap_embs, cap_lens, long_cap_embs, long_cap_lens)
    s = head.settings
    paper, beta, k = s.use_paper_version, s.beta, s.num_keep
    cls = img_embs[:, :1] if s.has_cls else None
    patches = img_embs[:, 1:] if s.has_cls else img_embs
    num_images, num_patches, width = patches.shape
    sparse_mlp = head.sparse_aggregation if s.use_dual_aggr else head.aggregation
    dense_mlp = head.dense_aggregation if s.use_dual_aggr else head.aggregation

    def select_and_aggregate(
        score: torch.Tensor, mlp: nn.Module, mask: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if mask is None:  # fixed count: one batched gather
            order = score.argsort(dim=1, descending=True)
            kept_idx, dropped_idx = order[:, :k], order[:, k:]
            kept = patches.gather(1, kept_idx[..., None].expand(-1, -1, width))
            dropped = patches.gather(1, dropped_idx[..., None].expand(-1, -1, width))
            fuse = torch.softmax(score.gather(1, dropped_idx).float(), dim=1)
            extra = (fuse[..., None] * dropped).sum(dim=1, keepdim=True)
            weights = torch.softmax((mlp(kept) * head.aggregation_scale).transpose(1, 2), dim=-1)  # (B_v, N_c, k)
            return torch.bmm(weights, kept), extra
        aggregated, extras = [], []
        for v in range(num_images):  # a count per image: gather image by image
            chosen = mask[v] > 0.5
            kept, dropped = patches[v, chosen], patches[v, ~chosen]
            fuse = torch.softmax(score[v, ~chosen].float(), dim=0)
            extras.append((fuse[:, None] * dropped).sum(dim=0, keepdim=True))
            weights = torch.softmax((mlp(kept) * head.aggregation_scale).t(), dim=-1)  # (N_c, kept)
            aggregated.append(weights @ kept)
        return torch.stack(aggregated), torch.stack(extras)

    def similarity(tokens: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        tokens = _unit(tokens)
        align = torch.matmul(tokens, words.t())  # (B_v, M, n_words)
        if not paper:
            align = torch.where(align > 0, align, SCAN_LEAKY_SLOPE * align)
        word_best, token_best = align.max(dim=1).values, align.max(dim=2).values
        sims = word_best.mean(dim=1) + token_best.mean(dim=1)
        if paper:
            for best in (word_best, token_best):
                top = best.sort(dim=1, descending=True).values[:, : s.top_k]
                top = torch.cat([top, top.new_zeros(num_images, s.top_k - top.shape[1])], dim=1)
                sims = sims + head.relevance_mlp(top)[:, 0]
        return sims

    # As in LAPS, the guidance scores that need no caption are computed once, before the loop.
    unit_patches64 = _unit(patches).double()
    saliency = (unit_patches64 * _unit(patches.double().mean(dim=1))[:, None]).sum(-1)
    dense_relevance = None
    if long_cap_embs is not None:
        dense_dirs = torch.stack(
            [_unit(long_cap_embs[v, : int(long_cap_lens[v])].double().mean(dim=0)) for v in range(num_images)]
        )
        dense_relevance = (unit_patches64 * dense_dirs[:, None]).sum(-1)

    columns = []
    for t in range(cap_embs.shape[0]):
        words = cap_embs[t, : int(cap_lens[t])]
        text_relevance = unit_patches64 @ _unit(words.double().mean(dim=0))
        if paper:
            predicted = torch.sigmoid(head.sparse_score_predictor(patches)[..., 0]).double()
            sparse_score = (1 - 2 * beta) * predicted + beta * (minmax(text_relevance) + 2 * minmax(saliency))
            if dense_relevance is not None:
                sparse_score = sparse_score + beta * minmax(dense_relevance)
        else:
            sparse_score = saliency + text_relevance
        sparse_keep = None if keep is None else keep[0][t]
        aggregated, extra = select_and_aggregate(sparse_score, sparse_mlp, sparse_keep)
        dense = None
        if dense_relevance is not None:
            if paper:
                predicted = torch.sigmoid(head.dense_score_predictor(patches)[..., 0]).double()
                dense_score = (1 - 2 * beta) * predicted + 2 * beta * (minmax(dense_relevance) + minmax(saliency))
            else:
                dense_score = saliency + dense_relevance
            dense = select_and_aggregate(dense_score, dense_mlp, None if keep is None else keep[1][t])
        unit_words = _unit(words)
        prefix = [cls] if cls is not None else []
        if dense is not None and s.use_dual_aggr:
            tokens = torch.cat(prefix + [aggregated + dense[0], (extra + dense[1]) / 2], dim=1)
            sims = similarity(tokens, unit_words)
        else:
            sims = similarity(torch.cat(prefix + [aggregated, extra], dim=1), unit_words)
            if dense is not None:
                sims = sims + similarity(torch.cat(prefix + list(dense), dim=1), unit_words)
        columns.append(sims)
    return torch.stack(columns, dim=1)
