"""RADI ranking distillation of a pointer selector from an MC-dropout teacher (``PointerSelectorV3``).

* ``radi_pairwise`` -- :func:`adaptive_pairwise_distillation_loss`: pairwise ranking distillation
  with adaptive soft margins from the teacher's MC-dropout uncertainty (Sinkhorn).
* ``radi_listwise`` -- :func:`partial_listwise_distillation_loss`: partial listwise distillation on
  a hot list (teacher top-k) and a sampled cold list, with ListNet or ListMLE.

Shapes: flattened lists ``(N, K)`` (``N = B * S`` selection steps of ``K`` candidates); teacher
logits ``(T, N, K)`` (``T`` MC-dropout passes) or ``(N, K)``. ``available`` masks as in
:mod:`lever_plugins.modules.masking`. Pure torch.
"""
from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch

from lever_plugins.modules.masking import TINY, check_available, masked_log_softmax

__all__ = [
    "RADI_PAIRWISE_SPACES",
    "mc_pairwise_uncertainty",
    "sinkhorn_margin_weights",
    "adaptive_pairwise_distillation_loss",
    "cold_list_probabilities",
    "sample_cold_positions",
    "listnet_loss",
    "listmle_loss",
    "partial_listwise_distillation_loss",
]

RADI_PAIRWISE_SPACES = ("logits", "probs")


# --------------------------------------------------------------------------------------------
# RADI pairwise: adaptive soft margins from MC-dropout teacher uncertainty
# --------------------------------------------------------------------------------------------


def _teacher_probs(teacher_logits: torch.Tensor, available: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(T, N, K)`` softmax of each teacher pass over the ``(N, K)`` available candidates (0 elsewhere).

    ``teacher_logits``: ``(T, N, K)`` MC-dropout passes or one ``(N, K)`` pass; no gradient flows into them.
    """
    shape = available.shape
    samples = teacher_logits.detach()
    if samples.shape == shape:
        samples = samples.unsqueeze(0)
    elif not (samples.dim() == len(shape) + 1 and samples.shape[1:] == shape):
        raise ValueError(
            f"teacher_logits must have shape {tuple(shape)} or (T, *{tuple(shape)}) "
            f"(T MC-dropout samples), got {tuple(teacher_logits.shape)}"
        )
    samples = samples.to(dtype).masked_fill(~available, float("-inf"))
    return torch.softmax(samples, dim=-1).masked_fill(~available, 0.0)


def mc_pairwise_uncertainty(teacher_probs: torch.Tensor) -> torch.Tensor:
    """RADI's pair uncertainty from ``T`` MC-dropout teacher passes.

    With ``g^t_ij = p^t_i - p^t_j`` the probability gap of pass ``t`` and ``g_ij`` its mean over the
    passes, ``U_ij = mean_t |g^t_ij - g_ij|``: how much the teacher's preference between ``i`` and
    ``j`` moves under dropout.

    Args:
        teacher_probs: ``(T, N, K)`` teacher probabilities.

    Returns:
        ``(N, K, K)`` symmetric, zero diagonal.
    """
    gaps = teacher_probs.unsqueeze(-1) - teacher_probs.unsqueeze(-2)  # (T, N, K, K)
    return (gaps - gaps.mean(0, keepdim=True)).abs().mean(0)


def sinkhorn_margin_weights(
    uncertainty: torch.Tensor,
    available: Optional[torch.Tensor] = None,
    epsilon: float = 1.0,
    num_iters: int = 50,
    tolerance: float = 1e-5,
) -> torch.Tensor:
    """Margin weights ``W`` from entropic optimal transport over the uncertainty matrix (RADI).

    Solves ``min_P <P, C> - epsilon * H(P)`` over pair plans whose rows and columns each carry
    ``1 / n`` (``n`` available candidates, diagonal excluded) with Sinkhorn iterations, where the
    cost ``C`` is the uncertainty divided by its mean over the list (so ``epsilon`` is relative and
    does not depend on the teacher's probability scale). ``W = n (n - 1) P`` has mean 1 over the
    pairs: uniform uncertainty gives ``W = 1`` (RADI's hard margin), and pairs the teacher is unsure
    about get smaller margins while the marginal constraints hand the mass to confident pairs.

    Args:
        uncertainty: ``(N, K, K)`` symmetric, non-negative.
        available: ``(N, K)`` bool (default: all); unavailable rows/columns get weight 0.
        epsilon: entropic regularisation (> 0); large -> uniform weights.
        num_iters: maximum Sinkhorn iterations.
        tolerance: stop early once every row sum is within this relative error of ``1 / n``.

    Returns:
        ``(N, K, K)`` weights, 0 on the diagonal and on unavailable candidates.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    n_lists, k, _ = uncertainty.shape
    if available is None:
        available = torch.ones(n_lists, k, dtype=torch.bool, device=uncertainty.device)
    eye = torch.eye(k, dtype=torch.bool, device=uncertainty.device)
    support = available.unsqueeze(-1) & available.unsqueeze(-2) & ~eye  # (N, K, K)
    n = available.sum(-1).to(uncertainty.dtype)  # (N,)
    n_pairs = support.sum((-1, -2)).to(uncertainty.dtype)
    mean_u = (uncertainty * support).sum((-1, -2)) / n_pairs.clamp_min(1.0)
    cost = uncertainty / mean_u.clamp_min(TINY)[:, None, None]
    # Work in log space: exp(-cost / eps) underflows for confident teachers at small epsilon.
    log_kernel = (-cost / epsilon).masked_fill(~support, float("-inf"))
    log_marginal = -torch.log(n.clamp_min(1.0))[:, None].expand_as(available)
    # Rows with no support (unavailable, or n < 2) keep scaling -inf instead of -inf - (-inf) = NaN.
    has_support = support.any(-1)
    log_u = torch.zeros_like(log_marginal)
    log_v = torch.zeros_like(log_marginal)
    for iteration in range(num_iters):
        log_u = log_marginal - _safe_logsumexp(log_kernel + log_v.unsqueeze(-2), dim=-1)
        log_u = log_u.masked_fill(~has_support, float("-inf"))
        log_v = log_marginal - _safe_logsumexp(log_kernel + log_u.unsqueeze(-1), dim=-2)
        log_v = log_v.masked_fill(~has_support, float("-inf"))
        # Columns are exact after the v-update; stop once the rows are too (checked every 5
        # iterations: each check is a device sync).
        if iteration % 5 == 4:
            row_log_sums = _safe_logsumexp(log_u.unsqueeze(-1) + log_kernel + log_v.unsqueeze(-2), dim=-1)
            row_error = (torch.exp(row_log_sums - log_marginal) - 1.0).abs().masked_fill(~has_support, 0.0)
            if float(row_error.max()) < tolerance:
                break
    log_plan = log_u.unsqueeze(-1) + log_kernel + log_v.unsqueeze(-2)
    plan = torch.exp(log_plan).masked_fill(~support, 0.0)
    return plan * n_pairs[:, None, None]


def _safe_logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``logsumexp`` that returns -inf (not NaN) for all -inf slices, and a NaN-free gradient."""
    finite_max = x.amax(dim=dim, keepdim=True).detach()
    finite_max = torch.where(torch.isfinite(finite_max), finite_max, torch.zeros_like(finite_max))
    summed = torch.exp(x - finite_max).sum(dim=dim, keepdim=True)
    out = torch.where(summed > 0, torch.log(summed.clamp_min(TINY)) + finite_max, float("-inf"))
    return out.squeeze(dim)


def adaptive_pairwise_distillation_loss(
    student_scores: torch.Tensor,
    teacher_logits: torch.Tensor,
    available: Optional[torch.Tensor] = None,
    margin: float = 1.0,
    epsilon: float = 1.0,
    num_iters: int = 50,
    top_k: Optional[int] = None,
    space: Literal["logits", "probs"] = "logits",
) -> torch.Tensor:
    """RADI pairwise ranking distillation with adaptive soft margins.

    ``L = mean over pairs (i, j) of max(0, M_ij - (s_i - s_j))`` where the pairs are those the
    teacher orders ``p_i > p_j`` (``p``: mean over MC samples of the teacher's softmax over the
    available candidates) with ``i`` among the teacher's ``top_k`` (``None``: all pairs) and
    ``M = margin * W``. ``space`` says what ``s`` is:

    * ``"logits"``: the student scores themselves (``margin`` in logit units);
    * ``"probs"``: the student's probabilities ``p_s(a) = softmax(student_scores)`` over the
      available candidates, RADI's own form as seed 003 writes it,
      ``max{0, m - (p_s(a_i) - p_s(a_j))}``; ``margin`` is then a probability gap (RADI's hard
      margin is 1, which no gap reaches, so every distilled pair pulls ``p_s(a_i)`` up and
      ``p_s(a_j)`` down, weighted by ``M_ij``).

    ``W`` comes from :func:`sinkhorn_margin_weights` of :func:`mc_pairwise_uncertainty`, rescaled so
    that its mean over the distilled pairs of each list is 1: ``margin`` stays the average margin,
    and confident pairs get more of it than uncertain ones. Restricting to pairs led by a top-k
    candidate (as the RADI authors' code does with its positives) leaves out tail-versus-tail
    pairs, whose probability gaps and fluctuations are both near 0 (they look "certain" to the
    absolute uncertainty measure) and whose order an imperfect teacher knows least. With one
    teacher sample (or no dropout) the uncertainty is 0, ``W = 1`` and this is the plain margin
    ranking loss with the teacher's ranking as the target. Averaged over the pairs of each list,
    then over lists.

    Args:
        student_scores: ``(N, K)``.
        teacher_logits: ``(T, N, K)`` MC-dropout samples or ``(N, K)``; no gradient flows into them.
        available: ``(N, K)`` bool (default: all).
        margin: base (mean) margin ``m``.
        epsilon, num_iters: Sinkhorn settings.
        top_k: only pairs whose better candidate is in the teacher's top ``top_k``.
        space: ``"logits"`` (hinge on score differences) or ``"probs"`` (on probability differences).

    Returns:
        Scalar.
    """
    available = check_available(student_scores, available)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if space not in RADI_PAIRWISE_SPACES:
        raise ValueError(f"space must be one of {RADI_PAIRWISE_SPACES}, got {space!r}")
    probs = _teacher_probs(teacher_logits, available, student_scores.dtype)
    weights = sinkhorn_margin_weights(mc_pairwise_uncertainty(probs), available, epsilon, num_iters)
    mean_probs = probs.mean(0)
    pairs = (mean_probs.unsqueeze(-1) > mean_probs.unsqueeze(-2)) & available.unsqueeze(-1) & available.unsqueeze(-2)
    if top_k is not None:
        teacher_rank = mean_probs.masked_fill(~available, -1.0).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        pairs = pairs & (teacher_rank < top_k).unsqueeze(-1)
    n_pairs = pairs.sum((-1, -2))
    has_pairs = n_pairs > 0
    pair_weight_mean = (weights * pairs).sum((-1, -2)) / n_pairs.clamp_min(1)
    weights = weights / pair_weight_mean.clamp_min(TINY)[:, None, None]
    if space == "probs":
        diff = masked_log_softmax(student_scores, available).exp().masked_fill(~available, 0.0)
    else:
        diff = student_scores.masked_fill(~available, 0.0)
    diff = diff.unsqueeze(-1) - diff.unsqueeze(-2)
    hinge = torch.relu(margin * weights - diff) * pairs
    per_list = hinge.sum((-1, -2)) / n_pairs.clamp_min(1)
    return (per_list * has_pairs).sum() / has_pairs.sum().clamp_min(1)


# --------------------------------------------------------------------------------------------
# RADI listwise: hot list + sampled cold list, ListNet / ListMLE
# --------------------------------------------------------------------------------------------


def cold_list_probabilities(
    n_remaining: int, sampling: Literal["exponential", "zipf"], alpha: float
) -> torch.Tensor:
    """Sampling distribution over the remaining (non-hot) candidates by teacher rank ``k = 1..n``.

    ``exponential``: ``p_k ∝ exp(-alpha k)``; ``zipf``: ``p_k ∝ k^(-alpha)``.

    Returns:
        ``(n_remaining,)`` float64 probabilities.
    """
    ranks = torch.arange(1, n_remaining + 1, dtype=torch.float64)
    if sampling == "exponential":
        weights = torch.exp(-alpha * (ranks - 1))  # shift by 1: same distribution, no underflow
    elif sampling == "zipf":
        weights = ranks.pow(-alpha)
    else:
        raise ValueError(f"sampling must be 'exponential' or 'zipf', got {sampling!r}")
    return weights / weights.sum()


def sample_cold_positions(
    n_remaining: torch.Tensor,
    num_samples: int,
    sampling: Literal["exponential", "zipf"],
    alpha: float,
    max_remaining: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample cold-list ranks without replacement, one list per row, batched (Gumbel top-k).

    Row ``r`` draws ``num_samples`` distinct 0-based ranks from ``0 .. n_remaining[r] - 1`` with
    :func:`cold_list_probabilities`; rows with fewer remaining candidates than ``num_samples``
    return all of them and flag the rest invalid. Ranks come back sorted (teacher order).

    Args:
        n_remaining: ``(N,)`` int, remaining candidates per row.
        num_samples: cold-list length.
        sampling, alpha: see :func:`cold_list_probabilities`.
        max_remaining: width of the rank axis (>= ``n_remaining.max()``).
        generator: optional RNG for reproducible draws.

    Returns:
        ``ranks (N, num_samples)`` int64 and ``valid (N, num_samples)`` bool.
    """
    device = n_remaining.device
    n_rows = n_remaining.shape[0]
    if num_samples == 0 or max_remaining == 0:
        empty = torch.zeros(n_rows, 0, dtype=torch.long, device=device)
        return empty, empty.bool()
    log_p = torch.log(cold_list_probabilities(max_remaining, sampling, alpha)).to(device)
    uniform = torch.rand(n_rows, max_remaining, generator=generator, dtype=torch.float64, device=device)
    gumbel = -torch.log(-torch.log(uniform.clamp(TINY, 1.0 - 1e-12)))
    positions = torch.arange(max_remaining, device=device)
    in_range = positions.unsqueeze(0) < n_remaining.unsqueeze(-1)
    # Only the relative weights matter for a draw, so truncating the distribution per row is exact.
    keys = (log_p.unsqueeze(0) + gumbel).masked_fill(~in_range, float("-inf"))
    take = min(num_samples, max_remaining)
    top_keys, ranks = keys.topk(take, dim=-1)
    valid = torch.isfinite(top_keys)
    # Sort valid ranks ascending, invalid ones last.
    order_key = torch.where(valid, ranks, ranks + max_remaining)
    order = order_key.argsort(dim=-1)
    ranks, valid = ranks.gather(-1, order), valid.gather(-1, order)
    if take < num_samples:
        pad = torch.zeros(n_rows, num_samples - take, dtype=torch.long, device=device)
        ranks = torch.cat([ranks, pad], -1)
        valid = torch.cat([valid, pad.bool()], -1)
    return ranks, valid


def listnet_loss(
    student_scores: torch.Tensor, teacher_scores: torch.Tensor, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """ListNet (top-one): ``-sum softmax(teacher) * log_softmax(student)`` over the valid entries.

    Args:
        student_scores: ``(N, L)``.
        teacher_scores: ``(N, L)`` (no gradient).
        valid: ``(N, L)`` bool (default: all).

    Returns:
        Scalar mean over lists.
    """
    valid = check_available(student_scores, valid)
    target = torch.softmax(teacher_scores.detach().masked_fill(~valid, float("-inf")), -1).masked_fill(~valid, 0.0)
    return -(target * masked_log_softmax(student_scores, valid)).sum(-1).mean()


def listmle_loss(student_scores: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ListMLE: negative Plackett-Luce log-likelihood of the list's own order (best first).

    ``sum_i [log sum_{j >= i} exp(s_j) - s_i]`` over the valid positions (invalid ones are skipped,
    wherever they are). The caller orders each list by the teacher.

    Args:
        student_scores: ``(N, L)`` in target order.
        valid: ``(N, L)`` bool (default: all).

    Returns:
        Scalar mean over lists.
    """
    valid = check_available(student_scores, valid)
    masked = student_scores.masked_fill(~valid, float("-inf"))
    # log sum_{j >= i} exp(s_j): reverse cumulative logsumexp.
    tail = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)
    terms = (tail - student_scores).masked_fill(~valid, 0.0)
    return terms.sum(-1).mean()


def partial_listwise_distillation_loss(
    student_scores: torch.Tensor,
    teacher_logits: torch.Tensor,
    available: Optional[torch.Tensor] = None,
    hot_k: int = 4,
    cold_k: int = 8,
    sampling: Literal["exponential", "zipf"] = "exponential",
    alpha: float = 0.5,
    list_loss: Literal["listnet", "listmle"] = "listnet",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """RADI partial listwise ranking distillation.

    Per row, the available candidates are ranked by the teacher's predictive probability (mean over
    MC samples). The list is the teacher's top ``hot_k`` (hot list) followed by ``cold_k`` candidates
    sampled without replacement from the rest with probability ``∝ exp(-alpha k)`` or ``k^-alpha``
    for teacher rank ``k`` among the rest (cold list), kept in teacher order. ListNet matches the
    student's softmax over the list to the teacher's (renormalised) probabilities; ListMLE maximises
    the Plackett-Luce likelihood of the teacher's order. Distilling only part of the ranking keeps
    the student from copying the teacher's errors deep in its tail.

    Args:
        student_scores: ``(N, K)``.
        teacher_logits: ``(T, N, K)`` MC samples or ``(N, K)`` (no gradient).
        available: ``(N, K)`` bool (default: all).
        hot_k: hot-list length (>= 1).
        cold_k: cold-list length (>= 0).
        sampling, alpha: cold-list sampling.
        list_loss: ``"listnet"`` or ``"listmle"``.
        generator: optional RNG for the cold-list draw.

    Returns:
        Scalar mean over rows.
    """
    if hot_k < 1 or cold_k < 0:
        raise ValueError(f"need hot_k >= 1 and cold_k >= 0, got hot_k={hot_k}, cold_k={cold_k}")
    if list_loss not in ("listnet", "listmle"):
        raise ValueError(f"list_loss must be 'listnet' or 'listmle', got {list_loss!r}")
    available = check_available(student_scores, available)
    probs = _teacher_probs(teacher_logits, available, student_scores.dtype).mean(0)
    log_teacher = torch.log(probs.clamp_min(TINY)).masked_fill(~available, float("-inf"))
    n_rows, k = student_scores.shape
    order = log_teacher.argsort(dim=-1, descending=True, stable=True)  # available first
    n_available = available.sum(-1)

    hot = min(hot_k, k)
    hot_pos = torch.arange(hot, device=student_scores.device).expand(n_rows, hot)
    hot_valid = hot_pos < n_available.unsqueeze(-1)
    n_remaining = (n_available - hot).clamp_min(0)
    cold_rank, cold_valid = sample_cold_positions(
        n_remaining, cold_k, sampling, alpha, max(k - hot, 0), generator
    )
    positions = torch.cat([hot_pos, cold_rank + hot], -1)
    valid = torch.cat([hot_valid, cold_valid], -1)
    positions = positions.clamp_max(k - 1)
    candidates = order.gather(-1, positions)
    student_list = student_scores.gather(-1, candidates)
    if list_loss == "listnet":
        teacher_list = log_teacher.gather(-1, candidates).masked_fill(~valid, 0.0)
        return listnet_loss(student_list, teacher_list, valid)
    return listmle_loss(student_list, valid)
