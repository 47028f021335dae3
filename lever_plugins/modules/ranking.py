"""Losses over pointer-selector logits: masked cross-entropy, V3 ranking losses, RADI distillation.

All losses take the selector's per-step scores over a candidate pool together with an
``available`` mask (``True`` where a candidate can still be chosen at that step). Candidates that are
not available are excluded from every softmax, pair and list, so ``-inf`` logits there are fine and
every loss stays finite.

Shapes: the pointer model produces logits ``(B, S, K)`` (batch, selection step, candidate pool); the
functions below accept any leading shape ``(..., K)`` unless they say otherwise, and the RADI losses
work on flattened lists ``(N, K)`` with ``N = B * S``.

Losses (``PointerSelectorV3.ranking_loss_type``):

* ``listwise`` -- :func:`listwise_beam_kl_loss`: KL from a target distribution built from the beam
  score of each labelled step (the seed-000 target, see :func:`beam_listwise_target`).
* ``pairwise`` -- :func:`hardest_negative_margin_loss`: hinge between the labelled candidate and the
  hardest still-available negative.
* ``radi_pairwise`` -- :func:`adaptive_pairwise_distillation_loss`: RADI pairwise ranking
  distillation with adaptive soft margins from MC-dropout teacher uncertainty (Sinkhorn).
* ``radi_listwise`` -- :func:`partial_listwise_distillation_loss`: RADI partial listwise
  distillation on a hot list (teacher top-k) and a sampled cold list, with ListNet or ListMLE.

Beam scores feed the ``listwise`` target through a sigmoid, so their scale matters:
:class:`BeamScoreTransform` (``none | zscore | rank``, fitted on the training beams' scores) puts raw
InfoScore gains on a logit-like scale before training.
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "RANKING_LOSS_TYPES",
    "BEAM_SCORE_TRANSFORMS",
    "RADI_PAIRWISE_SPACES",
    "BeamScoreTransform",
    "masked_cross_entropy",
    "masked_logits_std",
    "beam_listwise_target",
    "listwise_beam_kl_loss",
    "hardest_negative_margin_loss",
    "mc_pairwise_uncertainty",
    "sinkhorn_margin_weights",
    "adaptive_pairwise_distillation_loss",
    "cold_list_probabilities",
    "sample_cold_positions",
    "listnet_loss",
    "listmle_loss",
    "partial_listwise_distillation_loss",
]

RANKING_LOSS_TYPES = ("listwise", "pairwise", "radi_pairwise", "radi_listwise")
BEAM_SCORE_TRANSFORMS = ("none", "zscore", "rank")
RADI_PAIRWISE_SPACES = ("logits", "probs")

_TINY = 1e-12


def _check_available(logits: torch.Tensor, available: Optional[torch.Tensor]) -> torch.Tensor:
    if available is None:
        return torch.ones_like(logits, dtype=torch.bool)
    if available.shape != logits.shape:
        raise ValueError(
            f"available mask must have the shape of the scores {tuple(logits.shape)}, "
            f"got {tuple(available.shape)}"
        )
    return available.bool()


def _masked_log_softmax(scores: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the available entries; 0 (not -inf) at unavailable ones.

    Zero instead of -inf keeps ``0 * log p`` terms finite in the sums that follow; callers only ever
    weight those entries by 0.
    """
    masked = scores.masked_fill(~available, float("-inf"))
    return torch.log_softmax(masked, dim=-1).masked_fill(~available, 0.0)


def masked_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    available: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy with label smoothing spread over the *available* candidates only.

    ``F.cross_entropy(label_smoothing=eps)`` spreads ``eps`` over all K classes, which puts target
    mass on already-chosen candidates whose logit is -inf (an infinite loss). Here the target is
    ``(1 - eps) * onehot(label) + eps * uniform(available)``.

    Args:
        logits: ``(..., K)`` scores.
        labels: ``(...)`` int64 indices; each must be available.
        available: ``(..., K)`` bool, ``True`` where a candidate may be chosen (default: all).
        label_smoothing: ``eps`` in ``[0, 1)``.

    Returns:
        Scalar mean over all leading positions.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    available = _check_available(logits, available)
    log_probs = _masked_log_softmax(logits, available)
    nll = -log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if label_smoothing == 0.0:
        return nll.mean()
    uniform_nll = -log_probs.sum(-1) / available.sum(-1).clamp_min(1)
    return ((1.0 - label_smoothing) * nll + label_smoothing * uniform_nll).mean()


@torch.no_grad()
def masked_logits_std(logits: torch.Tensor, available: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Diagnostic: population std of the available logits of each step, averaged over steps.

    The seed's "logits std" health check (0.8-1.5 is healthy at temperature 0.1): near 0 means the
    selector cannot tell candidates apart, very large means over-confident scores.

    Args:
        logits: ``(..., K)``.
        available: ``(..., K)`` bool (default: all).

    Returns:
        Detached scalar.
    """
    available = _check_available(logits, available)
    weights = available.to(logits.dtype)
    count = weights.sum(-1).clamp_min(1.0)
    values = logits.masked_fill(~available, 0.0)
    mean = values.sum(-1, keepdim=True) / count.unsqueeze(-1)
    var = ((values - mean) ** 2 * weights).sum(-1) / count
    return var.sqrt().mean()


# --------------------------------------------------------------------------------------------
# Beam scores -> a logit-like scale
# --------------------------------------------------------------------------------------------


class BeamScoreTransform:
    """A monotone map of beam scores fitted on the training scores (all steps, all sequences pooled).

    ``kind``:

    * ``"none"``: the raw scores (InfoScore gains ``exp(-NLL)`` differences, or log-likelihood gains).
    * ``"zscore"``: ``(x - mean) / std`` with the training scores' mean and population std (std 1 when
      they are all equal).
    * ``"rank"``: rank-based inverse normal: ``Phi^-1(u)`` with ``u = (r + 1/2) / (n + 1)`` and ``r``
      the number of training scores below ``x`` plus half of those equal to it (mid-ranks for ties),
      so the j-th smallest of ``n`` distinct training scores maps to ``Phi^-1((j + 1) / (n + 1))``.
      Same scale as ``zscore`` but only the order of the scores counts, not their spacing (one
      outlying gain cannot flatten all the others).

    Pooling over steps keeps the difference between steps: a first step that raises the answer's
    probability a lot gets a high value, a second step that adds almost nothing a low one. Scores
    not seen in fitting (validation) go through the same map.

    Args:
        kind: ``"none" | "zscore" | "rank"``.
        scores: the training beam scores (any shape; flattened).
    """

    def __init__(self, kind: str, scores: Optional[torch.Tensor] = None) -> None:
        if kind not in BEAM_SCORE_TRANSFORMS:
            raise ValueError(f"beam-score transform must be one of {BEAM_SCORE_TRANSFORMS}, got {kind!r}")
        self.kind = kind
        reference = torch.zeros(0, dtype=torch.float64) if scores is None else scores.detach().double().flatten().cpu()
        if kind != "none" and reference.numel() == 0:
            raise ValueError(f"beam-score transform {kind!r} needs the training scores to fit on")
        if not torch.isfinite(reference).all():
            raise ValueError("beam scores must be finite")
        self.count = int(reference.numel())
        self.mean = float(reference.mean()) if self.count else 0.0
        std = float(reference.std(unbiased=False)) if self.count else 1.0
        self.std = std if std > _TINY else 1.0
        self.reference = reference.sort().values if kind == "rank" else reference[:0]

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """The transformed scores, same shape and dtype (float32 for integer input)."""
        dtype = scores.dtype if scores.is_floating_point() else torch.float32
        if self.kind == "none":
            return scores.to(dtype)
        values = scores.detach().double().cpu()
        if self.kind == "zscore":
            out = (values - self.mean) / self.std
        else:
            flat = values.flatten().contiguous()
            below = torch.searchsorted(self.reference, flat, right=False)
            up_to = torch.searchsorted(self.reference, flat, right=True)
            rank = (below + up_to).double() / 2.0
            quantile = (rank + 0.5) / (self.count + 1)
            out = (math.sqrt(2.0) * torch.erfinv(2.0 * quantile - 1.0)).reshape(values.shape)
        return out.to(device=scores.device, dtype=dtype)

    def describe(self) -> str:
        """One line for the log: what was fitted on how many scores."""
        if self.kind == "none":
            return "beam scores used as they are (beam_score_transform: none)"
        if self.kind == "zscore":
            return f"beam scores z-scored with mean {self.mean:.4g}, std {self.std:.4g} of {self.count} training scores"
        return f"beam scores rank-transformed (inverse normal) against {self.count} training scores"

    def __repr__(self) -> str:
        return f"BeamScoreTransform({self.kind!r}, count={self.count}, mean={self.mean:.4g}, std={self.std:.4g})"


# --------------------------------------------------------------------------------------------
# V3: listwise (beam-score target) and pairwise (hardest negative)
# --------------------------------------------------------------------------------------------


def beam_listwise_target(
    labels: torch.Tensor, beam_scores: torch.Tensor, available: torch.Tensor
) -> torch.Tensor:
    """Target distribution of the V3 listwise loss (seed 000's text).

    At step ``s`` the labelled candidate gets ``sigmoid(beam_scores[..., s])``; the rest of the mass
    is spread uniformly over the other candidates *still available* at that step (the seed writes
    ``(1 - p) / (K - 1)``; already-chosen candidates have model probability 0, so mass on them would
    make the KL infinite, hence ``K - 1`` becomes the number of available non-labelled candidates).
    When the label is the only available candidate, it gets all the mass.

    So a step whose beam score is high asks for a peaked distribution and a low-scoring step for a
    flat one: a per-step, score-dependent soft label. Beam scores should therefore be on a logit-like
    scale (sigmoid(0) = 0.5): raw InfoScore gains (mostly 0-0.1 with a real VLM) give a flat
    0.50-0.52 everywhere. The ICL pipeline transforms them first (:class:`BeamScoreTransform`,
    ``datasets.lever_vqa_icl.beam_score_transform``, z-score by default).

    Args:
        labels: ``(B, S)`` labelled candidate per step.
        beam_scores: ``(B, S)`` score of the labelled candidate at each step.
        available: ``(B, S, K)`` bool.

    Returns:
        ``(B, S, K)`` target, rows sum to 1, zero on unavailable candidates.
    """
    onehot = F.one_hot(labels, available.shape[-1]).bool()
    others = available & ~onehot
    n_others = others.sum(-1, keepdim=True)
    scores = beam_scores if beam_scores.is_floating_point() else beam_scores.float()
    p_label = torch.sigmoid(scores).unsqueeze(-1)
    p_label = torch.where(n_others > 0, p_label, torch.ones_like(p_label))
    rest = (1.0 - p_label) / n_others.clamp_min(1)
    return torch.where(onehot, p_label, torch.where(others, rest, torch.zeros_like(rest)))


def listwise_beam_kl_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    beam_scores: torch.Tensor,
    available: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """V3 listwise loss ``KL(P_target || P_model)`` with the target of :func:`beam_listwise_target`.

    ``P_model = softmax(logits)`` over the available candidates; ``logits`` already include the
    selector's temperature (the seed's ``softmax(logits / temperature)`` would divide twice). The
    seed writes ``KL(P_model || P_target)``; we use the distillation direction (target first, as
    ``F.kl_div(log P_model, P_target)`` computes), whose gradient w.r.t. the logits is simply
    ``P_model - P_target`` and which stays finite where the model puts no mass.

    Args:
        logits: ``(B, S, K)``.
        labels: ``(B, S)``.
        beam_scores: ``(B, S)`` beam score of ``labels[:, s]`` (same order as the beam file's
            ``icds`` / ``scores``).
        available: ``(B, S, K)`` bool (default: all).

    Returns:
        Scalar mean over the ``B * S`` steps.
    """
    available = _check_available(logits, available)
    if beam_scores.shape != labels.shape:
        raise ValueError(
            f"beam_scores must have the shape of labels {tuple(labels.shape)}, got {tuple(beam_scores.shape)}"
        )
    target = beam_listwise_target(labels, beam_scores.to(logits.dtype), available)
    log_probs = _masked_log_softmax(logits, available)
    kl = torch.xlogy(target, target) - target * log_probs
    return kl.sum(-1).mean()


def hardest_negative_margin_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    available: Optional[torch.Tensor] = None,
    margin: float = 1.0,
) -> torch.Tensor:
    """V3 pairwise loss: ``max(0, margin + max_{j != label, available} logit_j - logit_label)``.

    Steps with no available negative (the last step when ``K == S``) are left out of the mean; if no
    step has one, the loss is 0 (with a gradient graph, so ``backward`` still works).

    Args:
        logits: ``(..., K)``.
        labels: ``(...)``.
        available: ``(..., K)`` bool (default: all).
        margin: hinge margin in logit units.

    Returns:
        Scalar.
    """
    available = _check_available(logits, available)
    onehot = F.one_hot(labels, logits.shape[-1]).bool()
    negatives = available & ~onehot
    has_negative = negatives.any(-1)
    positive = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    hardest = logits.masked_fill(~negatives, float("-inf")).max(-1).values
    hardest = torch.where(has_negative, hardest, positive)  # placeholder, excluded below
    hinge = torch.relu(margin + hardest - positive)
    weights = has_negative.to(logits.dtype)
    return (hinge * weights).sum() / weights.sum().clamp_min(1.0)


# --------------------------------------------------------------------------------------------
# RADI pairwise: adaptive soft margins from MC-dropout teacher uncertainty
# --------------------------------------------------------------------------------------------


def _teacher_samples(teacher_logits: torch.Tensor, student_shape: torch.Size) -> torch.Tensor:
    if teacher_logits.shape == student_shape:
        return teacher_logits.unsqueeze(0)
    if teacher_logits.dim() == len(student_shape) + 1 and teacher_logits.shape[1:] == student_shape:
        return teacher_logits
    raise ValueError(
        f"teacher_logits must have shape {tuple(student_shape)} or (T, *{tuple(student_shape)}) "
        f"(T MC-dropout samples), got {tuple(teacher_logits.shape)}"
    )


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
    cost = uncertainty / mean_u.clamp_min(_TINY)[:, None, None]
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
    out = torch.where(summed > 0, torch.log(summed.clamp_min(_TINY)) + finite_max, float("-inf"))
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
    available = _check_available(student_scores, available)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if space not in RADI_PAIRWISE_SPACES:
        raise ValueError(f"space must be one of {RADI_PAIRWISE_SPACES}, got {space!r}")
    samples = _teacher_samples(teacher_logits.detach(), student_scores.shape).to(student_scores.dtype)
    probs = torch.softmax(samples.masked_fill(~available, float("-inf")), dim=-1).masked_fill(~available, 0.0)
    weights = sinkhorn_margin_weights(mc_pairwise_uncertainty(probs), available, epsilon, num_iters)
    mean_probs = probs.mean(0)
    pairs = (mean_probs.unsqueeze(-1) > mean_probs.unsqueeze(-2)) & available.unsqueeze(-1) & available.unsqueeze(-2)
    if top_k is not None:
        teacher_rank = mean_probs.masked_fill(~available, -1.0).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
        pairs = pairs & (teacher_rank < top_k).unsqueeze(-1)
    n_pairs = pairs.sum((-1, -2))
    has_pairs = n_pairs > 0
    pair_weight_mean = (weights * pairs).sum((-1, -2)) / n_pairs.clamp_min(1)
    weights = weights / pair_weight_mean.clamp_min(_TINY)[:, None, None]
    if space == "probs":
        diff = _masked_log_softmax(student_scores, available).exp().masked_fill(~available, 0.0)
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
    gumbel = -torch.log(-torch.log(uniform.clamp(_TINY, 1.0 - 1e-12)))
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
    valid = _check_available(student_scores, valid)
    target = torch.softmax(teacher_scores.detach().masked_fill(~valid, float("-inf")), -1).masked_fill(~valid, 0.0)
    return -(target * _masked_log_softmax(student_scores, valid)).sum(-1).mean()


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
    valid = _check_available(student_scores, valid)
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
    available = _check_available(student_scores, available)
    samples = _teacher_samples(teacher_logits.detach(), student_scores.shape).to(student_scores.dtype)
    probs = torch.softmax(samples.masked_fill(~available, float("-inf")), dim=-1).mean(0)
    log_teacher = torch.log(probs.clamp_min(_TINY)).masked_fill(~available, float("-inf"))
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
