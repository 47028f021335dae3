"""Settings of the pointer selectors V1/V2/V3 (:mod:`lever_plugins.modules.pointer`), and their size.

Every key is declared once, in one of three groups: :class:`PointerSelectorKeys` (read by every
version), :class:`CrossAttentionKeys` (read by V2 only) and :class:`RankingLossKeys` (read by V3
only). The per-version settings are a group sum (``PointerSelectorV2Settings`` = the common keys +
the cross-attention keys), and so is the recipe's flat ``model:`` block
(:class:`lever_plugins.schemas.icl.PointerSelectorSettings`, every group plus ``model_type``), which
finds the keys a version reads from these classes, never from a key list.

Pure Python (no torch): ``lever-plugins validate`` and ``--dry-run`` read it without building anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator, Literal

from lever_plugins.schema import Settings, setting


__all__ = [
    "PointerSelectorKeys",
    "CrossAttentionKeys",
    "RankingLossKeys",
    "PointerSelectorV1Settings",
    "PointerSelectorV2Settings",
    "PointerSelectorV3Settings",
    "SELECTOR_SETTINGS",
    "pointer_parameter_count",
]


def _label_smoothing(default: float):
    # One declaration, two defaults: the pointer-selector design smooths V1/V3 by 0.2 and V2 by 0.1.
    return setting(default, ge=0, lt=1, help="cross-entropy label smoothing (the pointer-selector design: V1/V3 0.2, V2 0.1)")


@dataclass(kw_only=True)
class PointerSelectorKeys(Settings):
    """The keys every version reads: the bi-encoder, its scoring and its decoding."""

    d_model: int = setting(768, help="width of the query / candidate embeddings (must match the embed stage)", ge=1)
    hidden_dim: int = setting(128, help="width after the shared input projection", ge=1)
    K: int = setting(32, help="candidate pool size per query (must equal run.beam_search.pool_size)", ge=1)
    shot_num: int = setting(6, help="demonstrations the selector picks per query at inference (decoding steps)", ge=1)
    temperature: float = setting(0.1, help="logits = cosine / temperature", gt=0)
    dropout: float = setting(0.3, help="dropout after query_proj / cand_proj", ge=0, lt=1)
    label_smoothing: float = _label_smoothing(0.2)
    query_update: Literal["none", "additive"] = setting(
        "none", help="query state across steps: fixed, or query + sum of the chosen candidates"
    )


@dataclass(kw_only=True)
class CrossAttentionKeys(Settings):
    """The keys only V2 reads: its query-to-candidates cross-attention."""

    num_heads: int = setting(4, help="v2: cross-attention heads (must divide hidden_dim)", ge=1)
    attn_dropout: float = setting(0.1, help="v2: dropout on the attention weights", ge=0, lt=1)


@dataclass(kw_only=True)
class RankingLossKeys(Settings):
    """The keys only V3 reads: its ranking loss (beam-score or RADI distillation)."""

    ranking_loss_type: Literal["listwise", "pairwise", "radi_pairwise", "radi_listwise"] = setting(
        "listwise", help="v3: listwise (KL to beam-score target) | pairwise (hardest negative) | RADI distillation"
    )
    ranking_loss_weight: float = setting(0.1, help="v3: lambda in loss = CE + lambda * ranking loss", ge=0)
    ranking_margin: float = setting(
        1.0, help="v3: hinge margin (pairwise: logit units; radi_pairwise: units of radi_pairwise_space)", gt=0
    )
    radi_pairwise_space: Literal["logits", "probs"] = setting(
        "logits", help="v3 radi_pairwise: hinge on student logit gaps, or on probability gaps p_s(a_i) - p_s(a_j) (RADI as written)"
    )
    radi_sinkhorn_epsilon: float = setting(1.0, help="v3 radi_pairwise: entropic regularisation (relative)", gt=0)
    radi_sinkhorn_iters: int = setting(50, help="v3 radi_pairwise: Sinkhorn iterations", ge=1)
    radi_hot_k: int = setting(
        4, help="v3 RADI teacher top-k: the hot list (radi_listwise); the better candidate of every pair (radi_pairwise)", ge=1
    )
    radi_cold_k: int = setting(8, help="v3 radi_listwise: candidates sampled into the cold list", ge=0)
    radi_cold_sampling: Literal["exponential", "zipf"] = setting(
        "exponential", help="v3 radi_listwise: cold-list sampling p_k ∝ exp(-alpha k) or k^-alpha"
    )
    radi_sampling_alpha: float = setting(0.5, help="v3 radi_listwise: alpha of the cold-list sampling", gt=0)
    radi_list_loss: Literal["listnet", "listmle"] = setting("listnet", help="v3 radi_listwise: list loss")
    radi_mc_samples: int = setting(8, help="v3 RADI: MC-dropout passes of the teacher", ge=1)


# The checks below call the earlier version's checks by name, not through super(): the recipe block
# (which is none of these classes, but has all their keys) runs the checks of its model_type on itself.


@dataclass(kw_only=True)
class PointerSelectorV1Settings(PointerSelectorKeys):
    """Settings of :class:`~lever_plugins.modules.pointer.PointerSelectorV1` (bi-encoder pointer selector)."""

    model_type: ClassVar[str] = "v1"

    def extra_problems(self) -> Iterator[str]:
        if self.shot_num > self.K:
            yield f"shot_num: cannot select {self.shot_num} distinct candidates from K = {self.K}"


@dataclass(kw_only=True)
class PointerSelectorV2Settings(CrossAttentionKeys, PointerSelectorV1Settings):
    """Settings of :class:`~lever_plugins.modules.pointer.PointerSelectorV2` (V1 + one cross-attention)."""

    model_type: ClassVar[str] = "v2"
    label_smoothing: float = _label_smoothing(0.1)

    def extra_problems(self) -> Iterator[str]:
        yield from PointerSelectorV1Settings.extra_problems(self)
        if self.hidden_dim % self.num_heads:
            yield f"num_heads: {self.num_heads} does not divide hidden_dim = {self.hidden_dim}"


@dataclass(kw_only=True)
class PointerSelectorV3Settings(RankingLossKeys, PointerSelectorV1Settings):
    """Settings of :class:`~lever_plugins.modules.pointer.PointerSelectorV3` (V1 + ranking loss; RADI options)."""

    model_type: ClassVar[str] = "v3"

    def extra_problems(self) -> Iterator[str]:
        yield from PointerSelectorV1Settings.extra_problems(self)
        if self.radi_hot_k > self.K:
            yield f"radi_hot_k: {self.radi_hot_k} is larger than the pool K = {self.K}"


# model_type -> the settings of that selector version
SELECTOR_SETTINGS = {cls.model_type: cls for cls in (PointerSelectorV1Settings, PointerSelectorV2Settings, PointerSelectorV3Settings)}


def pointer_parameter_count(d_model: int, hidden_dim: int, model_type: str) -> int:
    """Trainable parameters of the ``model_type`` selector (``"v1" | "v2" | "v3"``), without building it.

    With ``d = d_model`` and ``H = hidden_dim``: the shared ``input_proj`` ``dH + H`` and ``query_proj`` /
    ``cand_proj`` ``2 (H^2 + H)`` (131,456 at d = 768, H = 128); V2 adds the multi-head attention's in- and
    out-projections ``4H^2 + 4H`` and its LayerNorm ``2H`` (197,760 at H = 128; 592,128 at H = 256). V3 has
    V1's parameters (its ranking loss has none).
    """
    if model_type not in SELECTOR_SETTINGS:
        raise ValueError(f"model_type: expected one of {', '.join(map(repr, SELECTOR_SETTINGS))}, got {model_type!r}")
    d, h = int(d_model), int(hidden_dim)
    count = d * h + h + 2 * (h * h + h)
    if issubclass(SELECTOR_SETTINGS[model_type], CrossAttentionKeys):
        count += 4 * h * h + 4 * h + 2 * h
    return count


def describe_plan(data: dict) -> list[str]:
    """``--dry-run`` lines of ``lever_pointer_selector``: the selector and its parameter count."""
    model = data["model"]
    version = model["model_type"]
    count = pointer_parameter_count(model["d_model"], model["hidden_dim"], version)
    return [f"#   selector: PointerSelector{version.upper()}(d_model={model['d_model']}, hidden_dim={model['hidden_dim']}, "
            f"K={model['K']}, shot_num={model['shot_num']}): {count:,} parameters"]
