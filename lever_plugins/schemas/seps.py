"""Recipe schemas of the SEPS retrieval head (``model.seps_head:``) and its loss (``model.seps_loss:``).

Pure Python (no torch): ``lever-plugins validate`` reads these without building anything.
:class:`lever_plugins.modules.seps.CrossSparseAggrNet` is built from a :class:`SepsHeadSettings` and
:class:`lever_plugins.modules.seps_loss.SEPSLoss` from a :class:`SepsLossSettings` (kept as their
``settings``; keyword arguments go through :func:`lever_plugins.schema.settings_from`), so a bad value is
reported the same way from Python and from a recipe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

from lever_plugins.schema import Settings, setting

__all__ = [
    "SepsHeadSettings",
    "SepsLossSettings",
    "seps_head_parameter_count",
    "AGGREGATION_HIDDEN_RATIO",
]

# Hidden width of the aggregation MLP as a fraction of embed_size (LAPS uses 0.2).
AGGREGATION_HIDDEN_RATIO = 0.2


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _decimal(value: float) -> Fraction:
    """The number as written (``0.07`` is 7/100), so that counts are not off by one through float rounding."""
    return Fraction(repr(float(value)))


@dataclass
class SepsHeadSettings(Settings):
    """Settings of ``CrossSparseAggrNet``: text-guided patch selection, aggregation, fine-grained similarity.

    Derived sizes: ``num_keep = ceil(num_patches * sparse_ratio)`` is the evaluation budget of kept patches
    per (image, text) pair (in training the keep decisions choose the kept set, starting from that
    budget), the rest are fused into one extra token; the kept ones are aggregated into
    ``num_aggregated = int(num_patches * aggr_ratio * sparse_ratio)`` tokens.
    """

    embed_size: int = setting(512, ge=5, help="width C of the image patch and word embeddings")
    num_patches: int = setting(
        196, ge=2, help="patch tokens N per image, CLS excluded (ViT-B/16 at 224 px: 196; BLIP-2 ViT-g at 364 px: 676)"
    )
    has_cls: bool = setting(True, help="the first image token is a CLS token (kept aside, appended to the selected tokens)")
    sparse_ratio: float = setting(
        0.5,
        gt=0.0,
        lt=1.0,
        help="fraction rho of patches kept per pair: the evaluation budget ceil(N rho) and where the training "
        "keep decisions start (ViT 0.5, Swin 0.8)",
    )
    aggr_ratio: float = setting(0.4, gt=0.0, le=1.0, help="kept patches are aggregated into aggr_ratio of them (ViT 0.4, Swin 0.6)")
    use_paper_version: bool = setting(
        True,
        help="paper scoring (learned score predictor, normalised scores mixed by beta, dense-text guidance in the "
        "sparse branch) and paper similarity (cosine + top-k relevance MLP); false = public LAPS/SEPS code",
    )
    use_dual_aggr: bool = setting(
        True,
        help="joint sparse+dense aggregation into one token set (paper Eq. 4, score_mask is a (D_s, D_d) tuple); "
        "false = one token set per branch, similarities summed, score_mask a tensor",
    )
    use_gumbel_softmax: bool = setting(
        False,
        help="training: sample the per-patch keep decisions with two-way Gumbel noise (else the deterministic "
        "decision); the decisions choose the kept patches either way",
    )
    gumbel_tau: float = setting(
        1.0, gt=0.0, help="Gumbel temperature: softness of the keep decisions' backward pass (forward stays hard)"
    )
    selection_score_grad: bool = setting(
        False,
        help="let the selection scores' guidance cosines (patch vs image / caption / dense-caption mean) pass "
        "gradient to the embeddings; false = computed without gradient, as LAPS/SEPS do (the paper's score "
        "predictor trains either way)",
    )
    eval_by_decisions: bool = setting(
        False,
        help="evaluation keeps the patches the keep decisions mark (a count per pair, as in training) instead of "
        "the ceil(num_patches * sparse_ratio) best-scoring ones",
    )
    beta: float = setting(0.25, ge=0.0, le=0.5, help="paper Eq. 3 mix: (1-2 beta) predictor + beta (text + dense + 2 image)")
    top_k: int = setting(5, ge=1, help="paper similarity: the top_k best word/patch matches feed the relevance MLP")
    pair_chunk_size: int = setting(
        256,
        ge=1,
        help="(image, caption) pairs scored at once; bounds memory (and keeps the per-block tensors in cache on "
        "CPU), does not change the result; raise it on GPU",
    )
    checkpoint_pairs: bool = setting(
        False,
        help="training: recompute each block of pairs in the backward pass (128 x 128 batch: +0.6 GB instead of "
        "+3 GB, 1.2-1.5x the time)",
    )

    @property
    def num_keep(self) -> int:
        """Patches kept per pair: ``ceil(num_patches * sparse_ratio)``."""
        # Exact: in floats 100 * 0.07 = 7.000000000000001, whose ceil would keep 8.
        return math.ceil(self.num_patches * _decimal(self.sparse_ratio))

    @property
    def num_aggregated(self) -> int:
        """Aggregated tokens per pair: ``int(num_patches * aggr_ratio * sparse_ratio)``."""
        # Exact: in floats 180 * 0.7 * 0.5 = 62.99999999999999, whose int would give 62.
        return int(self.num_patches * _decimal(self.aggr_ratio) * _decimal(self.sparse_ratio))

    def extra_problems(self) -> Iterator[str]:
        if not all(_is_number(v) for v in (self.num_patches, self.sparse_ratio, self.aggr_ratio)):
            return
        if not 0 < self.sparse_ratio < 1 or self.num_patches < 2 or not 0 < self.aggr_ratio <= 1:
            return  # already reported as a bound problem
        if self.num_keep >= self.num_patches:
            yield (
                f"sparse_ratio: keeps ceil({self.num_patches} * {self.sparse_ratio}) = {self.num_keep} of "
                f"{self.num_patches} patches, leaving none to fuse into the extra token; use a smaller ratio"
            )
        if self.num_aggregated < 1:
            yield (
                f"aggr_ratio: int({self.num_patches} * {self.aggr_ratio} * {self.sparse_ratio}) = 0 aggregated "
                "tokens; raise aggr_ratio or sparse_ratio"
            )


@dataclass
class SepsLossSettings(Settings):
    """Settings of ``SEPSLoss``: hinge triplet alignment (both directions) + ``ratio_weight`` x ratio term."""

    margin: float = setting(0.2, ge=0.0, help="triplet margin alpha")
    target_ratio: float = setting(0.5, gt=0.0, le=1.0, help="target fraction rho of kept patches (match sparse_ratio)")
    ratio_weight: float = setting(2.0, ge=0.0, help="weight of the ratio term in the total loss")
    max_violation: bool = setting(
        False, help="only the hardest negative per anchor (VSE++); the recipe usually switches it on after warm-up"
    )
    lambda_sparse: float = setting(1.0, ge=0.0, help="weight lambda_1 of the sparse-branch ratio term")
    lambda_dense: float = setting(1.0, ge=0.0, help="weight lambda_2 of the dense-branch ratio term")


def seps_head_parameter_count(settings: SepsHeadSettings | None = None) -> int:
    """Trainable parameters of ``CrossSparseAggrNet`` built from ``settings``, without building it.

    With ``C = embed_size``, ``N_c = num_aggregated``, ``h = int(0.2 C)``:
    aggregation MLP ``2C + (C h + h) + (h N_c + N_c)`` (one with ``use_dual_aggr=False``, a sparse and a
    dense one with ``True``) + its scale 1; two keep thresholds 2; paper version only: two score
    predictors ``(C * C//4 + C//4) + (C//4 + 1)`` each and the relevance MLP
    ``(k * 2k + 2k) + 2k`` (last layer bias-free) with ``k = top_k``. Defaults: 246,393.
    """
    s = settings if settings is not None else SepsHeadSettings()
    c = s.embed_size
    hidden = int(c * AGGREGATION_HIDDEN_RATIO)
    aggregation = 2 * c + (c * hidden + hidden) + (hidden * s.num_aggregated + s.num_aggregated)
    total = aggregation * (2 if s.use_dual_aggr else 1) + 1 + 2
    if s.use_paper_version:
        quarter = c // 4
        total += 2 * ((c * quarter + quarter) + (quarter + 1))
        k = s.top_k
        total += (k * 2 * k + 2 * k) + 2 * k
    return total
