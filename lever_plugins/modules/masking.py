"""Scores over a candidate pool with an ``available`` mask: the checks every pointer-selector loss shares.

``available`` is ``True`` where a candidate can still be chosen at a step; unavailable candidates are
left out of every softmax, so ``-inf`` scores there are fine. Pure torch.
"""
from __future__ import annotations

from typing import Optional

import torch

TINY = 1e-12


def check_available(logits: torch.Tensor, available: Optional[torch.Tensor]) -> torch.Tensor:
    """``available`` as a bool mask of the shape of ``logits`` (``(..., K)``); ``None``: all available."""
    if available is None:
        return torch.ones_like(logits, dtype=torch.bool)
    if available.shape != logits.shape:
        raise ValueError(
            f"available mask must have the shape of the scores {tuple(logits.shape)}, "
            f"got {tuple(available.shape)}"
        )
    return available.bool()


def masked_log_softmax(scores: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the available entries; 0 (not -inf) at unavailable ones.

    Zero instead of -inf keeps ``0 * log p`` terms finite in the sums that follow; callers only ever
    weight those entries by 0.
    """
    masked = scores.masked_fill(~available, float("-inf"))
    return torch.log_softmax(masked, dim=-1).masked_fill(~available, 0.0)
