"""Step 3 of the SEPS head (pure torch): fine-grained similarity of a pair's tokens and a caption's words.

Used by :class:`lever_plugins.modules.seps.CrossSparseAggrNet`: each word's best token averaged over the
words plus each token's best word averaged over the tokens; the paper version adds a relevance MLP on the
``top_k`` best matches of both (Eq. 5), the public code takes LeakyReLU(0.1) of the cosines first (SCAN).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SCAN_LEAKY_SLOPE", "fine_grained_similarity", "pair_cosines"]

SCAN_LEAKY_SLOPE = 0.1


def pair_cosines(weights: torch.Tensor, patches: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Cosines between the tokens ``weights @ patches`` of every pair and the pair's caption words.

    Args:
        weights: ``(V, T * R, N)``, ``R`` tokens per (image, caption) pair, caption-major.
        patches: ``(V, N, C)``.
        words: ``(T, L, C)`` unit-norm.

    Returns:
        ``(V, T, R, L)``.
    """
    num_v, num_t = patches.shape[0], words.shape[0]
    tokens = torch.bmm(weights, patches)  # (V, T * R, C)
    # Caption-major so that each caption's words meet all its tokens in one matmul (no copy when V == 1).
    tokens = tokens.view(num_v, num_t, -1, tokens.shape[-1]).transpose(0, 1).reshape(num_t, -1, tokens.shape[-1])
    # Cosines without materialising normalised tokens: divide the dot products by the token norms.
    cosines = torch.bmm(tokens, words.transpose(1, 2)) / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return cosines.view(num_t, num_v, -1, words.shape[1]).transpose(0, 1)


def fine_grained_similarity(
    cosines: torch.Tensor,
    word_mask: torch.Tensor,
    word_counts: torch.Tensor,
    relevance_mlp: Optional[nn.Module] = None,
    top_k: int = 0,
) -> torch.Tensor:
    """Fine-grained similarity from token-word cosines.

    Args:
        cosines: ``(V, T, M, L)`` cosine of each of the pair's ``M`` tokens with each word.
        word_mask: ``(T, L)`` True for real words.
        word_counts: ``(T,)``.
        relevance_mlp: the paper version's relevance MLP (``top_k -> 1``), on plain cosines; None = the
            public code's similarity, on LeakyReLU(0.1) of the cosines (SCAN), without it.
        top_k: best matches fed to ``relevance_mlp``.

    Returns:
        ``(V, T)``: mean over words of each word's best token + mean over tokens of each token's best
        word (+ the relevance MLP on the top-k of both, paper version).
    """
    if relevance_mlp is None:
        cosines = F.leaky_relu(cosines, SCAN_LEAKY_SLOPE)
    valid = word_mask[None]  # (1, T, L)
    word_best = cosines.amax(dim=2)  # (V, T, L)
    word_term = (word_best * valid).sum(dim=-1) / word_counts
    token_best = cosines.masked_fill(~valid[:, :, None, :], float("-inf")).amax(dim=3)  # (V, T, M)
    sims = word_term + token_best.mean(dim=-1)
    if relevance_mlp is not None:
        word_best = word_best.masked_fill(~valid, float("-inf"))
        sims = sims + _relevance(relevance_mlp, word_best, top_k) + _relevance(relevance_mlp, token_best, top_k)
    return sims


def _relevance(mlp: nn.Module, best: torch.Tensor, top_k: int) -> torch.Tensor:
    """``mlp`` on the ``top_k`` best matches (``-inf`` = absent, counted as 0; padded with 0)."""
    top = best.topk(min(top_k, best.shape[-1]), dim=-1).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    if top.shape[-1] < top_k:
        top = F.pad(top, (0, top_k - top.shape[-1]))
    return mlp(top).squeeze(-1)
