"""Patch selection of the SEPS head (pure torch): selection-score pieces, keep decisions, selection weights.

Used by :class:`lever_plugins.modules.seps.CrossSparseAggrNet` (its docstring gives the method).

**Keep decisions decide.** A fixed top-k budget makes the kept fraction a constant, so a ratio loss
on the top-k mask (the public code) has no gradient and changes nothing. Here each branch turns its
selection score ``s`` into per-patch decisions (:func:`keep_decisions`): logit ``z = (s - m - theta) /
0.1`` with ``m`` the midpoint between the pair's ``num_keep``-th and next best score and ``theta`` a
learned offset per branch (0 at start, so the decisions start as the budget's top-``num_keep`` set);
forward ``D = [z > 0]``, backward the gradient of ``sigmoid(z)`` (straight-through). With
``use_gumbel_softmax``, in training, ``z`` gets two-way Gumbel (logistic) noise and the backward is
that of ``sigmoid(z / gumbel_tau)`` (seed default ``gumbel_tau = 1``). The best-scoring patch is always
kept and the worst always fused, so neither token set is ever empty. :func:`selection_weights` turns
a kept set (decisions or the budget's :func:`top_mask`) into the aggregation and extra-token softmaxes;
with decisions through :func:`policy_softmax`, so that the gradient reaches ``D``.

Selection scores are float64 so that chunking or sub-batching cannot flip a keep choice through rounding.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "KEEP_TEMPERATURE",
    "cosine64",
    "keep_decisions",
    "mean_direction64",
    "minmax",
    "per_item",
    "policy_softmax",
    "selection_weights",
    "top_mask",
]

KEEP_TEMPERATURE = 0.1
# Images (or captions) processed at once by the per-item work (float64 scores, MLPs on every patch),
# so that its temporaries stay small (a few MB: fresh large tensors cost page faults) even when all
# test images come at once.
_ITEM_CHUNK = 16


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise over the last dim (paper Eq. 2)."""
    low = x.amin(dim=-1, keepdim=True)
    high = x.amax(dim=-1, keepdim=True)
    return (x - low) / (high - low + 1e-8)


def mean_direction64(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Unit-norm mean of the first ``lengths[b]`` rows of ``x[b]``, in float64.

    Args:
        x: ``(B, L, C)``.
        lengths: ``(B,)`` valid rows per item.

    Returns:
        ``(B, C)`` float64.
    """
    out = []
    positions = torch.arange(x.shape[1], device=x.device)
    for start in range(0, x.shape[0], _ITEM_CHUNK):
        block = x[start : start + _ITEM_CHUNK].double()
        lens = lengths[start : start + _ITEM_CHUNK]
        valid = (positions[None, :] < lens[:, None]).to(block.dtype)
        mean = (block * valid[..., None]).sum(dim=1) / lens[:, None].to(block.dtype)
        out.append(F.normalize(mean, dim=-1))
    return torch.cat(out, dim=0)


def cosine64(unit_patches: torch.Tensor, *unit_queries: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """``(B, N)`` float64 cosines of each image's patches to each of that image's own query directions.

    Args:
        unit_patches: ``(B, N, C)`` unit-norm patches (converted to float64 once for all queries).
        unit_queries: ``(B, C)`` unit-norm float64 queries, one per image each.
    """
    queries = torch.stack(unit_queries, dim=-1)  # (B, C, Q)
    out = []
    for start in range(0, unit_patches.shape[0], _ITEM_CHUNK):
        block = unit_patches[start : start + _ITEM_CHUNK].double()
        out.append(torch.bmm(block, queries[start : start + _ITEM_CHUNK]))
    return torch.cat(out, dim=0).unbind(dim=-1)


def per_item(fn: Any, x: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to ``x`` in chunks of ``_ITEM_CHUNK`` along dim 0, results concatenated."""
    if x.shape[0] <= _ITEM_CHUNK:
        return fn(x)
    return torch.cat([fn(x[i : i + _ITEM_CHUNK]) for i in range(0, x.shape[0], _ITEM_CHUNK)], dim=0)


def top_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` highest entries along the last dim."""
    index = score.topk(k, dim=-1, sorted=False).indices
    return torch.zeros(score.shape, dtype=torch.bool, device=score.device).scatter_(-1, index, True)


class _PolicySoftmax(torch.autograd.Function):
    """``policy_i exp(x_i) / sum_j policy_j exp(x_j)`` over the last dim, saving what a softmax saves.

    Autograd of the plain formula would keep ``exp(x)`` and the product at every pair's full size (+25 %
    training memory); this saves the output, ``x`` as given (the aggregation logits are a per-image view
    broadcast over captions) and two per-row scalars.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        shift = x.masked_fill(policy <= 0, float("-inf")).amax(dim=-1, keepdim=True)
        # The clamp only touches masked-out entries above the kept maximum (it keeps exp finite there).
        weights = torch.exp((x - shift).clamp(max=0)) * policy
        total = weights.sum(dim=-1, keepdim=True)
        out = weights / total
        ctx.save_for_backward(x, out, shift, total)
        ctx.shapes = (x.shape, policy.shape, policy.dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        x, out, shift, total = ctx.saved_tensors
        x_shape, policy_shape, policy_dtype = ctx.shapes
        inner = grad - (grad * out).sum(dim=-1, keepdim=True)
        grad_x = grad_policy = None
        if ctx.needs_input_grad[0]:
            grad_x = (out * inner).sum_to_size(x_shape).to(x.dtype)
        if ctx.needs_input_grad[1]:  # d out_k / d policy_i = (e_i / Z) (delta_ki - out_k)
            would_be = torch.exp((x - shift).clamp(max=0)) / total
            grad_policy = (would_be * inner).sum_to_size(policy_shape).to(policy_dtype)
        return grad_x, grad_policy


def policy_softmax(x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Softmax of ``x`` over the last dim restricted to the entries where ``policy`` (0/1 values) is 1.

    ``policy_i exp(x_i) / sum_j policy_j exp(x_j)``: in the forward pass exactly the masked softmax,
    and a gradient reaches ``policy`` (straight-through decisions), as DynamicViT's attention with a
    keep policy. ``policy`` broadcasts to ``x`` and has at least one 1 per row.
    """
    return _PolicySoftmax.apply(x, policy)



def keep_decisions(
    score: torch.Tensor, offset: torch.Tensor, num_keep: int, gumbel_tau: Optional[float] = None
) -> torch.Tensor:
    """Keep decisions ``D (..., N)`` from selection scores: 0/1 forward, straight-through backward.

    ``z = (score - m - offset) / KEEP_TEMPERATURE`` with ``m`` the midpoint between the ``num_keep``-th
    and the next best score (``offset = 0``: exactly the budget's top set).

    Args:
        score: ``(..., N)`` float64 selection scores.
        offset: scalar learned threshold offset ``theta`` (its dtype is the decisions' dtype).
        num_keep: the budget, ``ceil(N * sparse_ratio)``.
        gumbel_tau: None = deterministic decisions; else two-way Gumbel noise on ``z`` and the backward of
            ``sigmoid(z / gumbel_tau)`` (the head passes it in training with ``use_gumbel_softmax``).

    Returns:
        ``(..., N)`` 0/1 in ``offset``'s dtype; the best patch is always kept and the worst always dropped
        (these two carry no gradient).
    """
    top = score.topk(num_keep + 1, dim=-1).values  # descending
    logit = (score - (top[..., -2:-1] + top[..., -1:]) / 2 - offset.double()) / KEEP_TEMPERATURE
    if gumbel_tau is not None:
        uniform = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
        logit = logit + torch.log(uniform) - torch.log1p(-uniform)  # two-way Gumbel = logistic noise
        prob = torch.sigmoid(logit / gumbel_tau)
    else:
        prob = torch.sigmoid(logit)
    prob = prob.to(offset.dtype)
    with torch.no_grad():
        best = score.argmax(dim=-1, keepdim=True)
        worst = score.scatter(-1, best, float("inf")).argmin(dim=-1, keepdim=True)
        free = torch.ones_like(prob).scatter_(-1, best, 0.0).scatter_(-1, worst, 0.0)
        hard = (logit > 0).to(prob.dtype).scatter_(-1, best, 1.0).scatter_(-1, worst, 0.0)
    return hard + (prob - prob.detach()) * free


def selection_weights(
    score: torch.Tensor, logits: Optional[torch.Tensor], keep: torch.Tensor
) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Aggregation and extra-token weights over all ``N`` patches (zero where not applicable).

    Args:
        score: ``(..., N)`` float64 selection score.
        logits: ``(..., N_c, N)`` aggregation logits (broadcastable to ``score``'s leading dims), or
            None with a bool ``keep`` (the budget path, which builds its aggregation weights itself).
        keep: ``(..., N)`` kept patches: bool (evaluation budget) or 0/1 float decisions.

    Returns:
        ``aggregation (..., N_c, N)`` (None when ``logits`` is None): softmax of the logits over the kept
        patches; ``extra (..., N)``: softmax of the dropped patches' scores (in the logits' dtype, in the
        score's when ``logits`` is None).
    """
    if keep.dtype == torch.bool:
        extra = torch.where(keep, float("-inf"), score if logits is None else score.to(logits.dtype)).softmax(-1)
        if logits is None:  # the budget path gathers its aggregation weights itself
            return None, extra
        aggregation = torch.where(keep.unsqueeze(-2), logits, float("-inf")).softmax(dim=-1)
        return aggregation, extra
    keep = keep.to(logits.dtype)
    return policy_softmax(logits, keep.unsqueeze(-2)), policy_softmax(score.to(logits.dtype), 1 - keep)
