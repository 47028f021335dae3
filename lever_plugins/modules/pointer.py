"""Pointer selectors V1/V2/V3: choose ``shot_num`` in-context demonstrations from a pool of ``K``.

Lineage: Lever-LM (NeurIPS 2024) and the user's pointer selectors (seeds 000, 001; SPEC §7).

Architecture (all versions)::

    query_emb (B, d) ──input_proj──► (B, H) ──[V2: cross-attn to candidates + residual + LN]──┐
    cand_emb (B, K, d) ─input_proj─► (B, K, H) ─────────────────────────────────────────────┤
                         query_proj / cand_proj (H -> H) ─► dropout ─► L2 norm ─► cosine / T

``input_proj`` (d -> H) is shared by query and candidates. Step ``s`` scores every candidate with
``logits[b, s, k] = cos(query_state_s, cand_k) / temperature`` and gives the candidates chosen at
earlier steps ``-inf``. Training is teacher-forced: the candidates removed at step ``s`` are
``labels[:, :s]``, never the model's own predictions.

**Query state across steps** (``query_update``):

* ``"none"`` (default, as in seeds 000/001 and their public code): the query state is fixed; steps
  differ only by which candidates are masked. Greedy decoding then returns the candidates in
  descending score order, and the model has no parameter tied to the step index.
* ``"additive"`` (Lever-LM-style conditioning on the chosen demonstrations, parameter-free):
  ``state_s = q + sum_{j < s} c_{y_j}`` in the projected space before the L2 norm, where ``q`` and
  ``c`` are the dropout-ed outputs of ``query_proj`` / ``cand_proj`` and ``y_j`` the candidate
  chosen at step ``j`` (the label in training, the prediction in :meth:`predict`). The update's
  strength relative to the query is learned through the norms of the two projections, which the
  cosine scoring otherwise ignores.

Losses: cross-entropy with label smoothing spread over the still-available candidates (V1, V2);
V3 adds ``ranking_loss_weight * ranking_loss`` (:mod:`lever_plugins.modules.ranking`).

**beam_scores convention**: ``beam_scores`` has shape ``(B, S)`` like ``labels``: ``labels[b]`` is the
beam file's ``icds`` (best first, as candidate-pool indices) and ``beam_scores[b]`` the matching
``scores`` entries, i.e. ``beam_scores[b, s]`` is the beam score of candidate ``labels[b, s]``.

Parameters: 131,456 for V1/V3 at the defaults (d_model 768, hidden 128), 197,760 for V2 (592,128, the
seed's 0.59 M, at hidden 256); :func:`lever_plugins.schemas.pointer.pointer_parameter_count` has the
formula and gives them without building a model.

Settings: ``PointerSelectorV{1,2,3}Settings`` (:mod:`lever_plugins.schemas.pointer`, pure Python). A
selector keeps its settings as ``self.settings``; it takes them as a settings object, a mapping of
their keys (checked by :func:`lever_plugins.schema.settings_from`) or ``None`` for the defaults.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from lever_plugins.modules import ranking as ranking_losses
from lever_plugins.schema import settings_from
from lever_plugins.schemas.pointer import PointerSelectorV1Settings, PointerSelectorV2Settings, PointerSelectorV3Settings

__all__ = [
    "PointerSelectorV1",
    "PointerSelectorV2",
    "PointerSelectorV3",
    "build_model_v1",
    "build_model_v2",
    "build_model_v3",
    "mc_dropout_logits",
]


class PointerSelectorV1(nn.Module):
    """Bi-encoder pointer selector (see the module docstring for the architecture).

    Args:
        settings: :class:`PointerSelectorV1Settings`, a mapping of its keys, or ``None`` for defaults.
    """

    settings_class: Type[PointerSelectorV1Settings] = PointerSelectorV1Settings

    def __init__(self, settings: Union[PointerSelectorV1Settings, Mapping[str, Any], None] = None, /,
                 **keys: Any) -> None:
        super().__init__()
        self.settings = settings_from(self.settings_class, settings, "model", **keys)
        cfg = self.settings
        self.input_proj = nn.Linear(cfg.d_model, cfg.hidden_dim)
        self.query_proj = nn.Linear(cfg.hidden_dim, cfg.hidden_dim)
        self.cand_proj = nn.Linear(cfg.hidden_dim, cfg.hidden_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    # -- encoding ---------------------------------------------------------------------------

    def _contextualise(self, query: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        """Hook for V2: refine the ``(B, H)`` query with the ``(B, K, H)`` candidates."""
        return query

    def encode(self, query_emb: torch.Tensor, cand_emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Project query and candidates; not yet L2-normalised.

        Args:
            query_emb: ``(B, d_model)``.
            cand_emb: ``(B, K, d_model)``.

        Returns:
            query ``(B, H)`` and candidates ``(B, K, H)``.
        """
        return self._encode_hidden(self.input_proj(query_emb), self.input_proj(cand_emb))

    def _encode_hidden(self, query: torch.Tensor, cands: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Everything after ``input_proj`` (the only part with dropout)."""
        query = self._contextualise(query, cands)
        return self.dropout(self.query_proj(query)), self.dropout(self.cand_proj(cands))

    def _check_inputs(
        self, query_emb: torch.Tensor, cand_emb: torch.Tensor, labels: Optional[torch.Tensor]
    ) -> None:
        cfg = self.settings
        if query_emb.dim() != 2 or query_emb.shape[-1] != cfg.d_model:
            raise ValueError(f"query_emb must be (B, d_model={cfg.d_model}), got {tuple(query_emb.shape)}")
        batch = query_emb.shape[0]
        if cand_emb.shape != (batch, cfg.K, cfg.d_model):
            raise ValueError(
                f"cand_emb must be (B={batch}, K={cfg.K}, d_model={cfg.d_model}), got {tuple(cand_emb.shape)}"
            )
        if labels is None:
            return
        if labels.dim() != 2 or labels.shape[0] != batch or not 1 <= labels.shape[1] <= cfg.K:
            raise ValueError(f"labels must be (B={batch}, S) with 1 <= S <= K={cfg.K}, got {tuple(labels.shape)}")
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"labels must hold integer candidate indices, got dtype {labels.dtype}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= cfg.K):
            raise ValueError(
                f"labels must be candidate indices in [0, {cfg.K}), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        if labels.shape[1] > 1 and (labels.sort(-1).values.diff(dim=-1) == 0).any():
            raise ValueError("labels repeat a candidate within a row; a demonstration can be chosen only once")

    # -- scoring ----------------------------------------------------------------------------

    def _teacher_forced_logits(
        self, query: torch.Tensor, cands: torch.Tensor, labels: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """All steps at once: ``logits (B, S, K)`` and ``available (B, S, K)``."""
        batch, k, hidden = cands.shape
        steps = labels.shape[1]
        cand_unit = F.normalize(cands, dim=-1)
        chosen = F.one_hot(labels, k)  # (B, S, K)
        chosen_before = (chosen.cumsum(1) - chosen) > 0
        if self.settings.query_update == "additive":
            picked = cands.gather(1, labels.unsqueeze(-1).expand(batch, steps, hidden))
            prefix = torch.cat([torch.zeros_like(picked[:, :1]), picked.cumsum(1)[:, :-1]], dim=1)
            states = F.normalize(query.unsqueeze(1) + prefix, dim=-1)
            logits = torch.einsum("bsh,bkh->bsk", states, cand_unit)
        else:
            logits = torch.einsum("bh,bkh->bk", F.normalize(query, dim=-1), cand_unit)
            logits = logits.unsqueeze(1).expand(batch, steps, k)
        logits = (logits / self.settings.temperature).masked_fill(chosen_before, float("-inf"))
        return logits, ~chosen_before

    def _greedy(
        self, query: torch.Tensor, cands: torch.Tensor, steps: int, top_k: int = 1
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Free-running decoding, batched over queries.

        Returns:
            ``logits (B, S, K)``, ``available (B, S, K)``, ``ranked (B, S, top_k)`` candidate indices
            by descending probability (column 0 is the pick that conditions later steps) and their
            probabilities ``(B, S, top_k)``.
        """
        batch, k, _ = cands.shape
        cand_unit = F.normalize(cands, dim=-1)
        additive = self.settings.query_update == "additive"
        state = query
        fixed_logits = None if additive else torch.einsum("bh,bkh->bk", F.normalize(query, dim=-1), cand_unit)
        chosen = torch.zeros(batch, k, dtype=torch.bool, device=cands.device)
        rows = torch.arange(batch, device=cands.device)
        all_logits, all_available, ranked, probs = [], [], [], []
        for _ in range(steps):
            if additive:
                raw = torch.einsum("bh,bkh->bk", F.normalize(state, dim=-1), cand_unit)
            else:
                raw = fixed_logits
            logits = (raw / self.settings.temperature).masked_fill(chosen, float("-inf"))
            step_probs = torch.softmax(logits, dim=-1)
            top_probs, top_idx = step_probs.topk(top_k, dim=-1)
            pick = top_idx[:, 0]
            all_logits.append(logits)
            all_available.append(~chosen)
            ranked.append(top_idx)
            probs.append(top_probs)
            chosen = chosen.clone()
            chosen[rows, pick] = True
            if additive:
                state = state + cands[rows, pick]
        return (
            torch.stack(all_logits, 1),
            torch.stack(all_available, 1),
            torch.stack(ranked, 1),
            torch.stack(probs, 1),
        )

    # -- public API -------------------------------------------------------------------------

    def forward(
        self,
        query_emb: torch.Tensor,
        cand_emb: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        beam_scores: Optional[torch.Tensor] = None,
        return_loss: bool = True,
        teacher_logits: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Score every step; teacher-forced when ``labels`` are given.

        Args:
            query_emb: ``(B, d_model)``.
            cand_emb: ``(B, K, d_model)``.
            labels: ``(B, S)`` candidate indices, best first (``S <= K``, no repeats); ``None``
                decodes greedily from the model's own picks (``S = shot_num``) and returns no loss.
            beam_scores: ``(B, S)`` beam score of ``labels[:, s]`` (used by V3 ``listwise``).
            return_loss: compute the losses (needs ``labels``).
            teacher_logits: ``(T, B, S, K)`` or ``(B, S, K)`` teacher scores for the RADI losses
                (see :func:`mc_dropout_logits`).

        Returns:
            ``logits (B, S, K)`` (``-inf`` on already-chosen candidates), ``predictions (B, S)``
            (arg-max per step), ``logits_std`` (detached diagnostic) and, with a loss: ``loss``,
            ``ce_loss`` and for V3 ``ranking_loss``.
        """
        self._check_inputs(query_emb, cand_emb, labels)
        query, cands = self.encode(query_emb, cand_emb)
        if labels is None:
            logits, available, _, _ = self._greedy(query, cands, self.settings.shot_num)
        else:
            labels = labels.long()
            logits, available = self._teacher_forced_logits(query, cands, labels)
        out: Dict[str, torch.Tensor] = {
            "logits": logits,
            "predictions": logits.argmax(-1),
            "logits_std": ranking_losses.masked_logits_std(logits, available),
        }
        if return_loss and labels is not None:
            out.update(self.compute_losses(logits, labels, available, beam_scores, teacher_logits))
        return out

    def compute_losses(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        available: torch.Tensor,
        beam_scores: Optional[torch.Tensor] = None,
        teacher_logits: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """``loss`` and its parts from teacher-forced ``logits (B, S, K)``."""
        ce = ranking_losses.masked_cross_entropy(logits, labels, available, self.settings.label_smoothing)
        return {"loss": ce, "ce_loss": ce}

    @torch.no_grad()
    def predict(
        self, query_emb: torch.Tensor, cand_emb: torch.Tensor, top_k: int = 1
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Select ``shot_num`` distinct candidates per query, autoregressively and batched.

        Runs in eval mode (dropout off) and restores the previous mode. Each step picks the most
        probable still-available candidate; that pick conditions the later steps.

        Args:
            query_emb: ``(B, d_model)``.
            cand_emb: ``(B, K, d_model)``.
            top_k: candidates ranked per step, ``1 <= top_k <= K - shot_num + 1`` (every step then
                has at least ``top_k`` available candidates).

        Returns:
            ``top_k == 1``: ``predictions (B, S)`` and their probabilities ``scores (B, S)``.
            ``top_k > 1``: ``predictions (B, S, top_k)``, the per-step ranking of the available
            candidates (column 0 is the greedy pick, equal to the ``top_k == 1`` output), and
            ``scores (B, S, top_k)`` their probabilities (softmax over the available candidates).
        """
        cfg = self.settings
        max_top_k = cfg.K - cfg.shot_num + 1
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= max_top_k:
            raise ValueError(f"top_k must be an integer in [1, K - shot_num + 1 = {max_top_k}], got {top_k!r}")
        self._check_inputs(query_emb, cand_emb, None)
        was_training = self.training
        self.eval()
        try:
            query, cands = self.encode(query_emb, cand_emb)
            _, _, ranked, probs = self._greedy(query, cands, cfg.shot_num, top_k)
        finally:
            self.train(was_training)
        if top_k == 1:
            return ranked.squeeze(-1), probs.squeeze(-1)
        return ranked, probs


class PointerSelectorV2(PointerSelectorV1):
    """V1 + one multi-head cross-attention from the query to the candidates, residual + LayerNorm.

    ``q <- LayerNorm(q + MHA(q, cands, cands))`` on the ``hidden_dim`` features after ``input_proj``,
    before ``query_proj``. The attention sees the whole pool (it does not change across steps).

    Args:
        settings: :class:`PointerSelectorV2Settings`, a mapping of its keys, or ``None``.
    """

    settings_class = PointerSelectorV2Settings
    settings: PointerSelectorV2Settings

    def __init__(self, settings: Union[PointerSelectorV2Settings, Mapping[str, Any], None] = None, /,
                 **keys: Any) -> None:
        super().__init__(settings, **keys)
        cfg = self.settings
        self.cross_attn = nn.MultiheadAttention(
            cfg.hidden_dim, cfg.num_heads, dropout=cfg.attn_dropout, batch_first=True
        )
        self.attn_norm = nn.LayerNorm(cfg.hidden_dim)

    def _contextualise(self, query: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        attended, _ = self.cross_attn(query.unsqueeze(1), cands, cands, need_weights=False)
        return self.attn_norm(query + attended.squeeze(1))


class PointerSelectorV3(PointerSelectorV1):
    """V1 architecture + ranking loss: ``loss = ce_loss + ranking_loss_weight * ranking_loss``.

    ``ranking_loss_type``:

    * ``listwise``: ``KL(P_target || P_model)`` per step; ``P_target`` puts
      ``sigmoid(beam_scores[b, s])`` on the labelled candidate and spreads the rest uniformly over
      the other available candidates (seed 000's text, not its public code's beam-aggregate target;
      see :func:`~lever_plugins.modules.ranking.beam_listwise_target`). Needs ``beam_scores``.
    * ``pairwise``: hinge between the labelled candidate and the hardest available negative,
      margin ``ranking_margin`` (logit units).
    * ``radi_pairwise`` / ``radi_listwise``: RADI distillation from ``teacher_logits`` (e.g.
      :func:`mc_dropout_logits` of a trained V1/V2), per step over the available candidates.
      ``radi_pairwise_space`` puts the pairwise hinge on the student's logits (default) or, as
      seed 003 writes RADI, on its probabilities ``p_s(a_i) - p_s(a_j)``.

    The listwise target reads ``beam_scores`` through a sigmoid, so they should be on a logit-like
    scale; the ICL pipeline standardises them first (``datasets.lever_vqa_icl.beam_score_transform``).

    Args:
        settings: :class:`PointerSelectorV3Settings`, a mapping of its keys, or ``None``.
        generator: optional RNG for the RADI cold-list sampling, on the device of the inputs.
    """

    settings_class = PointerSelectorV3Settings
    settings: PointerSelectorV3Settings

    def __init__(
        self,
        settings: Union[PointerSelectorV3Settings, Mapping[str, Any], None] = None, /,
        generator: Optional[torch.Generator] = None,
        **keys: Any,
    ) -> None:
        super().__init__(settings, **keys)
        self.generator = generator

    def compute_losses(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        available: torch.Tensor,
        beam_scores: Optional[torch.Tensor] = None,
        teacher_logits: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        out = super().compute_losses(logits, labels, available)
        rank = self.ranking_loss(logits, labels, available, beam_scores, teacher_logits)
        out["ranking_loss"] = rank
        out["loss"] = out["ce_loss"] + self.settings.ranking_loss_weight * rank
        return out

    def ranking_loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        available: torch.Tensor,
        beam_scores: Optional[torch.Tensor] = None,
        teacher_logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The configured ranking loss on teacher-forced ``logits (B, S, K)``."""
        cfg = self.settings
        kind = cfg.ranking_loss_type
        if kind == "listwise":
            if beam_scores is None:
                raise ValueError("ranking_loss_type 'listwise' needs beam_scores (B, S), the beam file's 'scores'")
            return ranking_losses.listwise_beam_kl_loss(logits, labels, beam_scores.to(logits.device), available)
        if kind == "pairwise":
            return ranking_losses.hardest_negative_margin_loss(logits, labels, available, cfg.ranking_margin)
        if teacher_logits is None:
            raise ValueError(
                f"ranking_loss_type {kind!r} needs teacher_logits (T, B, S, K) or (B, S, K); "
                "build them with mc_dropout_logits(teacher, query_emb, cand_emb, labels)"
            )
        batch, steps, k = logits.shape
        flat_logits = logits.reshape(batch * steps, k)
        flat_available = available.reshape(batch * steps, k)
        if teacher_logits.dim() == 4:
            flat_teacher = teacher_logits.reshape(teacher_logits.shape[0], batch * steps, k)
        elif teacher_logits.dim() == 3:
            flat_teacher = teacher_logits.reshape(batch * steps, k)
        else:
            raise ValueError(
                f"teacher_logits must be (T, B, S, K) or (B, S, K), got {tuple(teacher_logits.shape)}"
            )
        if kind == "radi_pairwise":
            return ranking_losses.adaptive_pairwise_distillation_loss(
                flat_logits,
                flat_teacher,
                flat_available,
                margin=cfg.ranking_margin,
                epsilon=cfg.radi_sinkhorn_epsilon,
                num_iters=cfg.radi_sinkhorn_iters,
                top_k=cfg.radi_hot_k,
                space=cfg.radi_pairwise_space,
            )
        return ranking_losses.partial_listwise_distillation_loss(
            flat_logits,
            flat_teacher,
            flat_available,
            hot_k=cfg.radi_hot_k,
            cold_k=cfg.radi_cold_k,
            sampling=cfg.radi_cold_sampling,
            alpha=cfg.radi_sampling_alpha,
            list_loss=cfg.radi_list_loss,
            generator=self.generator,
        )


@torch.no_grad()
def mc_dropout_logits(
    teacher: PointerSelectorV1,
    query_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    labels: torch.Tensor,
    num_samples: int = 8,
) -> torch.Tensor:
    """Teacher-forced logits of ``num_samples`` MC-dropout passes (dropout on), for RADI.

    ``input_proj`` (d_model -> hidden, most of the compute, no dropout) runs once; the layers after
    it run as one batch of ``num_samples * B`` rows. The teacher's mode is restored.

    Args:
        teacher: a trained selector (its settings' K / d_model must match the inputs).
        query_emb: ``(B, d_model)``.
        cand_emb: ``(B, K, d_model)``.
        labels: ``(B, S)``.
        num_samples: ``T``.

    Returns:
        ``(T, B, S, K)``, ``-inf`` on already-chosen candidates.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    teacher._check_inputs(query_emb, cand_emb, labels)
    was_training = teacher.training
    teacher.train()
    try:
        hidden_query, hidden_cands = teacher.input_proj(query_emb), teacher.input_proj(cand_emb)
        query, cands = teacher._encode_hidden(
            hidden_query.repeat(num_samples, 1), hidden_cands.repeat(num_samples, 1, 1)
        )
        logits, _ = teacher._teacher_forced_logits(query, cands, labels.long().repeat(num_samples, 1))
    finally:
        teacher.train(was_training)
    return logits.reshape(num_samples, query_emb.shape[0], *logits.shape[1:])


def build_model_v1(config: Union[PointerSelectorV1Settings, Mapping[str, Any], None] = None) -> PointerSelectorV1:
    """Build a :class:`PointerSelectorV1` (the seeds' call style; defaults: d 768, H 128, K 32, 6 shots, 131,456 params)."""
    return PointerSelectorV1(config)


def build_model_v2(config: Union[PointerSelectorV2Settings, Mapping[str, Any], None] = None) -> PointerSelectorV2:
    """Build a :class:`PointerSelectorV2` (the seeds' call style; defaults: 4 heads, H 128 -> 197,760 params)."""
    return PointerSelectorV2(config)


def build_model_v3(
    config: Union[PointerSelectorV3Settings, Mapping[str, Any], None] = None,
    generator: Optional[torch.Generator] = None,
) -> PointerSelectorV3:
    """Build a :class:`PointerSelectorV3` (defaults: listwise, lambda 0.1, 131,456 params)."""
    return PointerSelectorV3(config, generator=generator)
