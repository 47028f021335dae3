"""Losses over pointer-selector logits: masked cross-entropy and the V3 ranking losses.

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
* ``radi_pairwise``, ``radi_listwise`` -- RADI distillation from an MC-dropout teacher
  (:mod:`lever_plugins.modules.radi`).

Beam scores feed the ``listwise`` target through a sigmoid, so their scale matters:
:class:`BeamScoreTransform` (``none | zscore | rank``, fitted on the training beams' scores) puts raw
InfoScore gains on a logit-like scale before training.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from lever_plugins.modules.masking import TINY, check_available, masked_log_softmax
# PointerSelectorV3 reaches every ranking_loss_type through this module; the RADI ones live in radi.py.
from lever_plugins.modules.radi import adaptive_pairwise_distillation_loss, partial_listwise_distillation_loss

__all__ = [
    "BEAM_SCORE_TRANSFORMS",
    "BeamScoreTransform",
    "masked_cross_entropy",
    "masked_logits_std",
    "beam_listwise_target",
    "listwise_beam_kl_loss",
    "hardest_negative_margin_loss",
    "adaptive_pairwise_distillation_loss",
    "partial_listwise_distillation_loss",
]

BEAM_SCORE_TRANSFORMS = ("none", "zscore", "rank")


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
    available = check_available(logits, available)
    log_probs = masked_log_softmax(logits, available)
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
    available = check_available(logits, available)
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
        self.std = std if std > TINY else 1.0
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
    available = check_available(logits, available)
    if beam_scores.shape != labels.shape:
        raise ValueError(
            f"beam_scores must have the shape of labels {tuple(labels.shape)}, got {tuple(beam_scores.shape)}"
        )
    target = beam_listwise_target(labels, beam_scores.to(logits.dtype), available)
    log_probs = masked_log_softmax(logits, available)
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
    available = check_available(logits, available)
    onehot = F.one_hot(labels, logits.shape[-1]).bool()
    negatives = available & ~onehot
    has_negative = negatives.any(-1)
    positive = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    hardest = logits.masked_fill(~negatives, float("-inf")).max(-1).values
    hardest = torch.where(has_negative, hardest, positive)  # placeholder, excluded below
    hinge = torch.relu(margin + hardest - positive)
    weights = has_negative.to(logits.dtype)
    return (hinge * weights).sum() / weights.sum().clamp_min(1.0)
