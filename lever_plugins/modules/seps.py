"""SEPS retrieval head (pure torch): text-guided patch selection, aggregation and fine-grained similarity.

``CrossSparseAggrNet`` scores every (image v, caption t) pair of a batch; ``SEPSLoss`` (defined in
:mod:`lever_plugins.modules.seps_loss`, re-exported here) trains it.
Lineage: LAPS (CVPR 2024) and SEPS (2025, adds a dense MLLM-written caption per image). For one pair:

1. **Selection.** Each patch ``i`` of image ``v`` gets a score from image self-saliency ``s_im`` (cosine
   to the image's mean patch), text relevance ``s_st`` (cosine to the caption's mean word) and dense
   relevance ``s_dt`` (cosine to the mean word of *image v's* dense caption). Keep decisions ``D``
   (below) choose the kept patches in training; evaluation keeps the top ``num_keep = ceil(N *
   sparse_ratio)`` by score. The dropped ones are fused into one extra token, weighted by the softmax
   of their scores.
2. **Aggregation.** An MLP on each patch (LayerNorm, Linear, GELU, Linear) gives ``N_c =
   int(N * aggr_ratio * sparse_ratio)`` logits; their softmax over the kept patches yields ``N_c``
   weighted combinations of the kept patches.
3. **Similarity.** Word-patch cosines ``A (L, M)`` between the caption's words and the pair's tokens
   ``[CLS] + N_c aggregated + extra``: each word's best token averaged over the words, plus the
   symmetric term (each token's best word averaged over the tokens).

Two branches: the *sparse* branch is guided by the caption, the *dense* branch by the image's dense
caption. **Dense captions belong to the image side**: ``long_cap_embs`` has one row per image and pair
(v, t) uses image v's dense caption. (The public SEPS evaluation gave every caption the dense text of
its own ground-truth image, so every score saw the answer.) The dense branch is therefore a function
of the image alone and is computed once per image. The dense text enters the final similarity only
through the patches it selects: the *query caption's* words are matched against the dense-branch
tokens too (matching image v's dense words against image v's own tokens would add a caption-independent
per-image constant, which biases text-to-image ranking and carries no information about the pair).

``use_paper_version`` switches:

* ``True`` (SEPS paper): score ``(1 - 2 beta) s_p + beta (s_st + s_dt + 2 s_im)`` with each guidance
  term min-max normalised over the patches and ``s_p = sigmoid(MLP(patch))`` a learned score predictor
  per branch (Eq. 1-3); the dense branch, which must not depend on the caption, uses
  ``(1 - 2 beta) s_p + beta (2 s_dt + 2 s_im)``. Similarity on plain cosines, plus a relevance MLP on
  the ``top_k`` best word and token matches (Eq. 5).
* ``False`` (public LAPS/SEPS code): raw score ``s_im + s_st`` (dense branch ``s_im + s_dt``), no
  score predictor and no dense guidance in the sparse branch; similarity on LeakyReLU(0.1) of the
  cosines (SCAN), no relevance MLP.

``use_dual_aggr`` (independent of the above) switches:

* ``True`` (paper Eq. 4): one token set per pair: sparse-branch aggregation of the pair's kept patches
  plus dense-branch aggregation of the image's kept patches (separate MLPs), extra token = mean of the
  two branches' extra tokens; one similarity. ``score_mask = (D_s, D_d)``.
* ``False``: one token set per branch (one shared aggregation MLP), the two similarities summed.
  ``score_mask`` is the tensor ``(D_s + D_d) / 2`` (so that its mean is a kept fraction comparable to
  ``rho``; the public code summed the two masks, making the ratio target unreachable).

The public code corresponds to ``use_paper_version=False, use_dual_aggr=False`` (except for the dense
leak and the dense similarity term, see above). Without dense captions (``long_cap_embs=None``) only the
sparse branch runs and ``score_mask`` is ``D_s``. ``D_s`` and ``D_d`` are ``(B_t, B_v, N)``; ``D_d``
depends on the image only and is an expanded view of a ``(B_v, N)`` tensor.

``num_patches`` fixes ``num_keep`` and ``N_c`` (the aggregation MLP's output width); the input must carry
exactly that many patches (after the CLS token when ``has_cls``), and a mismatch is an error that names
``has_cls``, never a guess from the token count.

**Keep decisions decide.** Each branch turns its selection score into per-patch keep decisions ``D``
(0/1 forward, straight-through backward, a learned threshold offset ``theta`` per branch starting at the
budget's cut; :mod:`lever_plugins.modules.seps_selection` gives the formula and why a top-k mask trains
nothing).

* *Training*: the kept set of each pair is the one ``D`` marks, a count that varies per pair. Masks
  over the ``N`` patches carry it (no gathers): the aggregation softmax is weighted by ``D`` and the
  extra-token softmax by ``1 - D``, exactly the masked softmaxes in the forward pass, and the
  alignment loss reaches ``D`` through them. The returned ``score_mask`` is that ``D``: its mean is the
  fraction actually kept, and the ratio loss on it moves ``theta`` (and, in the paper version, the
  score predictors), which changes the kept sets and so the similarities.
* *Evaluation*: the ``num_keep`` best-scoring patches per pair (static shapes, batched, deterministic);
  ``eval_by_decisions=True`` keeps the ``D`` set instead (no noise: training's computation without
  Gumbel).

**Selection scores without gradient.** As in LAPS/SEPS, the guidance cosines ``s_im``, ``s_st``,
``s_dt`` are computed without gradient: they choose patches but nothing is trained through them.
``selection_score_grad=True`` lets them pass gradient to the patch and word embeddings (through the
extra-token weights, and through ``D`` by the straight-through estimator). The paper's score predictor
``s_p`` is the learned part of the score and always receives gradient, as in the reference.

**Cost.** Work that depends only on the image (self-saliency, score predictors, aggregation logits,
the whole dense branch) or only on the caption is done once; the per-pair work (text relevance,
selection, masked softmax, one batched matmul, similarity) runs over blocks of at most
``pair_chunk_size`` pairs, with no Python loop over captions. A pair's score does not depend on the rest
of the batch: selection scores are computed in float64, so chunking or sub-batching cannot flip a keep
choice through rounding (Gumbel noise, when on, is drawn per block). Evaluation with the budget (a fixed
count per pair) takes a faster route to the same numbers (``_budget_similarities``). Training memory
grows with ``B_v * B_t`` because autograd keeps every block's intermediates (measured ~250 kB per pair at
the defaults: +4.2 GB for a 128 x 128 batch); ``checkpoint_pairs=True`` recomputes each block in the
backward pass instead (+0.6 GB at 128 x 128, 1.2-1.5x the CPU time).

Shapes: ``B_v`` images, ``B_t`` captions, ``N`` patches, ``C`` = ``embed_size``, ``L_s``/``L_d`` words.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lever_plugins.modules.seps_loss import SEPSLoss, ScoreMask
from lever_plugins.modules.seps_selection import (
    cosine64,
    keep_decisions,
    mean_direction64,
    minmax,
    per_item,
    selection_weights,
    top_mask,
)
from lever_plugins.modules.seps_similarity import fine_grained_similarity, pair_cosines
from lever_plugins.schema import settings_from
from lever_plugins.schemas.seps import AGGREGATION_HIDDEN_RATIO, SepsHeadSettings

__all__ = ["CrossSparseAggrNet", "SEPSLoss", "ScoreMask"]

# Evaluation normalises exp(logit - image max) over each pair's kept patches; a pair whose kept sum falls
# below this (float32 subnormals are 1e13 times smaller) takes the exact masked softmax instead.
_UNDERFLOW = 1e-25


class _ImageSide(NamedTuple):
    """Everything that depends on the images only, computed once per forward."""

    patches: torch.Tensor  # (B_v, N, C) raw patch tokens
    cls: Optional[torch.Tensor]  # (B_v, 1, C) raw CLS token, or None
    unit_patches: torch.Tensor  # (B_v, N, C)
    sparse_base: torch.Tensor  # (B_v, N) float64: image-only part of the sparse-branch score
    sparse_logits: torch.Tensor  # (B_v, N_c, N) aggregation logits of the sparse branch
    dense_aggregation: Optional[torch.Tensor]  # dual: (B_v, N_c, N) dense-branch aggregation weights
    dense_extra: Optional[torch.Tensor]  # dual: (B_v, N) dense-branch extra-token weights
    dense_tokens: Optional[torch.Tensor]  # not dual: (B_v, M, C) unit-norm dense-branch tokens
    dense_decision: Optional[torch.Tensor]  # deciding (training): (B_v, N) keep decisions D_d


class _TextSide(NamedTuple):
    unit_words: torch.Tensor  # (B_t, L_s, C)
    word_mask: torch.Tensor  # (B_t, L_s) bool
    word_counts: torch.Tensor  # (B_t,) float
    direction64: torch.Tensor  # (B_t, C) float64 unit mean word


def _aggregation_mlp(embed_size: int, num_aggregated: int) -> nn.Sequential:
    hidden = int(embed_size * AGGREGATION_HIDDEN_RATIO)
    return nn.Sequential(
        nn.LayerNorm(embed_size),
        nn.Linear(embed_size, hidden),
        nn.GELU(),
        nn.Linear(hidden, num_aggregated),
    )


def _score_predictor(embed_size: int) -> nn.Sequential:
    quarter = embed_size // 4
    return nn.Sequential(nn.Linear(embed_size, quarter), nn.GELU(), nn.Linear(quarter, 1))


class CrossSparseAggrNet(nn.Module):
    """SEPS head: all-pairs similarity of images and captions through per-pair patch selection.

    Args:
        settings: a :class:`SepsHeadSettings` (every key documented there), a mapping of its keys (a recipe
            block) or None; or leave it out and give the keys as keyword arguments
            (``CrossSparseAggrNet(embed_size=512, num_patches=196, ...)``, the seed's call). Kept as
            ``self.settings``.

    Raises:
        ValueError: unknown keys or values out of range (every problem, each naming its key).
    """

    def __init__(self, settings: Union[SepsHeadSettings, Mapping[str, Any], None] = None, /, **kwargs: Any) -> None:
        super().__init__()
        self.settings: SepsHeadSettings = settings_from(SepsHeadSettings, settings, "seps_head", **kwargs)
        s = self.settings
        if s.use_dual_aggr:
            self.sparse_aggregation = _aggregation_mlp(s.embed_size, s.num_aggregated)
            self.dense_aggregation = _aggregation_mlp(s.embed_size, s.num_aggregated)
        else:
            self.aggregation = _aggregation_mlp(s.embed_size, s.num_aggregated)
        self.aggregation_scale = nn.Parameter(torch.ones(()))
        if s.use_paper_version:
            self.sparse_score_predictor = _score_predictor(s.embed_size)
            self.dense_score_predictor = _score_predictor(s.embed_size)
            self.relevance_mlp = nn.Sequential(
                nn.Linear(s.top_k, 2 * s.top_k),
                nn.GELU(),
                # No bias: a constant added to every score cancels in any ranking loss (it would never train).
                nn.Linear(2 * s.top_k, 1, bias=False),
            )
        # Offsets of the decision threshold from the budget's cut (0: start at the top-num_keep set).
        self.sparse_keep_threshold = nn.Parameter(torch.zeros(()))
        self.dense_keep_threshold = nn.Parameter(torch.zeros(()))

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        img_embs: torch.Tensor,
        cap_embs: torch.Tensor,
        cap_lens: torch.Tensor,
        long_cap_embs: Optional[torch.Tensor] = None,
        long_cap_lens: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, ScoreMask]]:
        """Similarity of every image with every caption.

        Args:
            img_embs: ``(B_v, N(+1), C)`` image tokens, CLS first when ``has_cls``.
            cap_embs: ``(B_t, L_s, C)`` caption word embeddings (padded).
            cap_lens: ``(B_t,)`` words per caption, ``1 <= len <= L_s``.
            long_cap_embs: ``(B_v, L_d, C)`` dense caption of each *image* (row v belongs to image v), or None.
            long_cap_lens: ``(B_v,)`` words per dense caption.

        Returns:
            Eval mode: ``sims (B_v, B_t)``, each pair keeping its ``num_keep`` best-scoring patches (or its
            decisions' patches with ``eval_by_decisions``). Training mode: ``(sims, score_mask)``, each
            pair keeping the patches its decisions mark, ``score_mask`` those keep decisions ``(D_s,
            D_d)``, each ``(B_t, B_v, N)``, when ``use_dual_aggr`` and dense captions are given, else one
            ``(B_t, B_v, N)`` tensor (module docstring); its mean is the fraction actually kept.
        """
        s = self.settings
        cap_lens, long_cap_lens = self._check_inputs(img_embs, cap_embs, cap_lens, long_cap_embs, long_cap_lens)
        need_mask = self.training
        decide = self.training or s.eval_by_decisions
        image = self._encode_images(img_embs, long_cap_embs, long_cap_lens, decide)
        text = self._encode_captions(cap_embs, cap_lens)
        if not decide:
            return self._budget_similarities(image, text)

        num_images, num_captions = img_embs.shape[0], cap_embs.shape[0]
        captions_per_block = min(num_captions, s.pair_chunk_size)
        images_per_block = max(1, min(num_images, s.pair_chunk_size // captions_per_block))
        checkpointed = need_mask and s.checkpoint_pairs and torch.is_grad_enabled()
        sim_rows, mask_rows = [], []
        for v0 in range(0, num_images, images_per_block):
            images = slice(v0, min(v0 + images_per_block, num_images))
            sim_blocks, mask_blocks = [], []
            for t0 in range(0, num_captions, captions_per_block):
                captions = slice(t0, min(t0 + captions_per_block, num_captions))
                if checkpointed:
                    # Non-reentrant checkpoint restores the RNG state, so Gumbel noise is replayed exactly.
                    sims, decision = checkpoint(
                        self._score_block, image, text, images, captions, decide, use_reentrant=False
                    )
                else:
                    sims, decision = self._score_block(image, text, images, captions, decide)
                sim_blocks.append(sims)
                mask_blocks.append(decision)
            sim_rows.append(torch.cat(sim_blocks, dim=1))
            if need_mask:
                mask_rows.append(torch.cat(mask_blocks, dim=1))
        sims = torch.cat(sim_rows, dim=0)
        if not need_mask:
            return sims

        sparse_decision = torch.cat(mask_rows, dim=0).transpose(0, 1).contiguous()  # (B_t, B_v, N)
        if image.dense_decision is None:
            return sims, sparse_decision
        dense_decision = image.dense_decision.unsqueeze(0).expand_as(sparse_decision)
        if s.use_dual_aggr:
            return sims, (sparse_decision, dense_decision)
        return sims, (sparse_decision + dense_decision) / 2

    # ------------------------------------------------------------------ pieces

    def _check_inputs(
        self,
        img_embs: torch.Tensor,
        cap_embs: torch.Tensor,
        cap_lens: torch.Tensor,
        long_cap_embs: Optional[torch.Tensor],
        long_cap_lens: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Validate shapes; return the lengths as int64 tensors on the embeddings' device."""
        name, s = type(self).__name__, self.settings
        c = s.embed_size
        if img_embs.dim() != 3 or img_embs.shape[-1] != c:
            raise ValueError(
                f"{name}: img_embs must be (B_v, N(+1), embed_size={c}), got shape {tuple(img_embs.shape)}"
            )
        if cap_embs.dim() != 3 or cap_embs.shape[-1] != c:
            raise ValueError(
                f"{name}: cap_embs must be (B_t, L_s, embed_size={c}), got shape {tuple(cap_embs.shape)}"
            )
        patches = img_embs.shape[1] - int(s.has_cls)
        if patches != s.num_patches:
            hint = (
                "set has_cls=False if the tokens carry no CLS token"
                if s.has_cls
                else "set has_cls=True if the first token is a CLS token"
            )
            raise ValueError(
                f"{name}: img_embs has {img_embs.shape[1]} tokens, i.e. {patches} patches with "
                f"has_cls={s.has_cls}, but the head was built for num_patches={s.num_patches}; "
                f"{hint}, or build the head with num_patches={patches}"
            )
        if img_embs.shape[0] == 0 or cap_embs.shape[0] == 0:
            raise ValueError(f"{name}: need at least one image and one caption")
        cap_lens = self._check_lengths(cap_lens, cap_embs, "cap_lens", "cap_embs", "B_t")
        if (long_cap_embs is None) != (long_cap_lens is None):
            raise ValueError(f"{name}: give both long_cap_embs and long_cap_lens, or neither")
        if long_cap_embs is None:
            return cap_lens, None
        if long_cap_embs.dim() != 3 or long_cap_embs.shape[-1] != c:
            raise ValueError(
                f"{name}: long_cap_embs must be (B_v, L_d, embed_size={c}), got shape {tuple(long_cap_embs.shape)}"
            )
        if long_cap_embs.shape[0] != img_embs.shape[0]:
            raise ValueError(
                f"{name}: long_cap_embs has {long_cap_embs.shape[0]} rows but there are {img_embs.shape[0]} "
                "images; dense captions belong to the image side (one row per image: pair (v, t) uses "
                "image v's dense caption)"
            )
        long_cap_lens = self._check_lengths(long_cap_lens, long_cap_embs, "long_cap_lens", "long_cap_embs", "B_v")
        return cap_lens, long_cap_lens

    def _check_lengths(
        self, lengths: torch.Tensor, embs: torch.Tensor, name: str, embs_name: str, batch: str
    ) -> torch.Tensor:
        lengths = torch.as_tensor(lengths, device=embs.device)
        if lengths.dim() != 1 or lengths.shape[0] != embs.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: {name} must be ({batch},) = ({embs.shape[0]},), got shape {tuple(lengths.shape)}"
            )
        if lengths.is_floating_point() and not torch.equal(lengths, lengths.round()):
            raise ValueError(f"{type(self).__name__}: {name} must hold whole numbers, got {lengths.tolist()}")
        lengths = lengths.long()
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > embs.shape[1]:
            bad = int(torch.nonzero((lengths < 1) | (lengths > embs.shape[1]))[0])
            raise ValueError(
                f"{type(self).__name__}: {name}[{bad}] = {int(lengths[bad])} is outside 1..{embs.shape[1]} "
                f"(the {embs_name} length)"
            )
        return lengths

    def _select(self, score: torch.Tensor, offset: torch.Tensor, decide: bool) -> torch.Tensor:
        """Kept patches ``(..., N)``: the decisions (float 0/1, differentiable) or the budget's top set (bool)."""
        s = self.settings
        if not decide:
            return top_mask(score, s.num_keep)
        noise_tau = s.gumbel_tau if self.training and s.use_gumbel_softmax else None  # Gumbel: training only
        return keep_decisions(score, offset, s.num_keep, noise_tau)

    def _predicted_scores(self, predictor: nn.Module, patches: torch.Tensor) -> torch.Tensor:
        """Paper Eq. 1: ``sigmoid(MLP(patch))``, ``(B, N)`` float64."""
        return per_item(lambda x: torch.sigmoid(predictor(x).squeeze(-1)).double(), patches)

    def _aggregation_logits(self, mlp: nn.Module, patches: torch.Tensor) -> torch.Tensor:
        """Aggregation logits of every patch, ``(B, N_c, N)``."""
        # Contiguous so that the per-pair masked softmax over patches runs on standard-layout memory.
        return per_item(lambda x: (mlp(x) * self.aggregation_scale).transpose(1, 2).contiguous(), patches)

    def _encode_images(
        self,
        img_embs: torch.Tensor,
        long_cap_embs: Optional[torch.Tensor],
        long_cap_lens: Optional[torch.Tensor],
        decide: bool,
    ) -> _ImageSide:
        s = self.settings
        cls = img_embs[:, :1] if s.has_cls else None
        patches = img_embs[:, 1:] if s.has_cls else img_embs
        with torch.set_grad_enabled(torch.is_grad_enabled() and s.selection_score_grad):
            unit_patches = F.normalize(patches, dim=-1)
            image_direction = F.normalize(per_item(lambda x: x.double().mean(dim=1), patches), dim=-1)
            dense_relevance = None
            if long_cap_embs is None:
                (saliency,) = cosine64(unit_patches, image_direction)  # s_im, (B_v, N)
            else:  # s_im and s_dt
                dense_direction = mean_direction64(long_cap_embs, long_cap_lens)
                saliency, dense_relevance = cosine64(unit_patches, image_direction, dense_direction)

        beta = s.beta
        if s.use_paper_version:
            saliency_n = minmax(saliency)
            sparse_base = (1 - 2 * beta) * self._predicted_scores(self.sparse_score_predictor, patches)
            sparse_base = sparse_base + beta * 2 * saliency_n
            if dense_relevance is not None:
                sparse_base = sparse_base + beta * minmax(dense_relevance)
        else:
            sparse_base = saliency
        sparse_mlp = self.sparse_aggregation if s.use_dual_aggr else self.aggregation
        sparse_logits = self._aggregation_logits(sparse_mlp, patches)

        dense_aggregation = dense_extra = dense_tokens = dense_decision = None
        if dense_relevance is not None:
            if s.use_paper_version:
                dense_score = (1 - 2 * beta) * self._predicted_scores(self.dense_score_predictor, patches)
                dense_score = dense_score + beta * 2 * (minmax(dense_relevance) + saliency_n)
            else:
                dense_score = saliency + dense_relevance
            dense_mlp = self.dense_aggregation if s.use_dual_aggr else self.aggregation
            dense_logits = self._aggregation_logits(dense_mlp, patches)
            keep = self._select(dense_score, self.dense_keep_threshold, decide)
            dense_aggregation, dense_extra = self._selection_weights(dense_score, dense_logits, keep)
            if not s.use_dual_aggr:
                dense_tokens = self._dense_tokens(dense_aggregation, dense_extra, patches, cls)
                dense_aggregation = dense_extra = None
            if decide:
                dense_decision = keep
        return _ImageSide(
            patches, cls, unit_patches, sparse_base, sparse_logits, dense_aggregation, dense_extra, dense_tokens,
            dense_decision,
        )

    def _encode_captions(self, cap_embs: torch.Tensor, cap_lens: torch.Tensor) -> _TextSide:
        word_mask = torch.arange(cap_embs.shape[1], device=cap_embs.device)[None, :] < cap_lens[:, None]
        return _TextSide(
            unit_words=F.normalize(cap_embs, dim=-1),
            word_mask=word_mask,
            word_counts=cap_lens.to(cap_embs.dtype),
            direction64=mean_direction64(cap_embs, cap_lens) if self.settings.selection_score_grad
            else mean_direction64(cap_embs.detach(), cap_lens),
        )

    def _selection_weights(
        self, score: torch.Tensor, logits: Optional[torch.Tensor], keep: torch.Tensor
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """:func:`~lever_plugins.modules.seps_selection.selection_weights`; every path that chooses kept
        patches passes its choice through this method (tests record ``keep`` here)."""
        return selection_weights(score, logits, keep)

    def _sparse_score(self, image: _ImageSide, images: slice, relevance: torch.Tensor) -> torch.Tensor:
        """``(V, T, N)`` float64 sparse-branch selection scores from the text relevance ``s_st (V, T, N)``."""
        if self.settings.use_paper_version:
            return image.sparse_base[images, None] + self.settings.beta * minmax(relevance)
        return image.sparse_base[images, None] + relevance

    def _dense_tokens(
        self, aggregation: torch.Tensor, extra: torch.Tensor, patches: torch.Tensor, cls: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Unit-norm per-image tokens ``[CLS, aggregation @ patches, extra @ patches]``, ``(B, M, C)``."""
        tokens = [torch.bmm(aggregation, patches), torch.bmm(extra.unsqueeze(1), patches)]
        if cls is not None:
            tokens.insert(0, cls)
        return F.normalize(torch.cat(tokens, dim=1), dim=-1)

    def _score_block(
        self, image: _ImageSide, text: _TextSide, images: slice, captions: slice, decide: bool
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Similarities ``(v, t)`` and (when deciding) sparse keep decisions ``(v, t, N)`` for one block."""
        relevance = torch.einsum("vnc,tc->vtn", image.unit_patches[images].double(), text.direction64[captions])
        score = self._sparse_score(image, images, relevance)
        keep = self._select(score, self.sparse_keep_threshold, decide)
        aggregation, extra = self._selection_weights(score, image.sparse_logits[images, None], keep)
        if image.dense_aggregation is not None:
            # Paper Eq. 4: sparse and dense aggregations summed; the extra token is the two branches' mean.
            aggregation = aggregation + image.dense_aggregation[images, None]
            extra = (extra + image.dense_extra[images, None]) / 2
        patches, words = image.patches[images], text.unit_words[captions]  # (v, N, C), (t, L, C)
        num_v, num_t, rows, num_patches = aggregation.shape
        cosines = [
            pair_cosines(aggregation.view(num_v, num_t * rows, num_patches), patches, words),
            pair_cosines(extra, patches, words),
        ]
        if image.cls is not None:
            unit_cls = F.normalize(image.cls[images, 0], dim=-1)
            cosines.insert(0, torch.einsum("vc,tlc->vtl", unit_cls, words).unsqueeze(2))
        mask, counts = text.word_mask[captions], text.word_counts[captions]
        sims = self._similarity(torch.cat(cosines, dim=2), mask, counts)
        if image.dense_tokens is not None:
            dense_cosines = torch.einsum("vmc,tlc->vtml", image.dense_tokens[images], words)
            sims = sims + self._similarity(dense_cosines, mask, counts)
        return sims, keep if decide else None

    def _budget_similarities(self, image: _ImageSide, text: _TextSide) -> torch.Tensor:
        """``(B_v, B_t)`` similarities when every pair keeps its ``num_keep`` best patches (evaluation).

        The computation of :meth:`_score_block` with the budget's top set, arranged for speed (blocks of
        at most ``pair_chunk_size`` pairs, image-major): the masked softmax of the aggregation logits over
        each pair's kept patches is ``keep * e / (keep @ e)`` with ``e = exp(logits - max)`` computed once
        per image, and the extra token's weights ride along as one more row, so all tokens of a block
        come from one batched matmul ``(T * (N_c + 1), N) @ (N, C)`` per image and all their cosines from
        one more. Without gradient the block tensors are written into buffers allocated once per forward
        (fresh multi-MB tensors per block cost more in page faults than the arithmetic). No row mixes two
        pairs, so a pair's score does not depend on the rest of the batch.
        """
        num_images, num_captions = image.patches.shape[0], text.unit_words.shape[0]
        captions_per_block = min(num_captions, self.settings.pair_chunk_size)
        images_per_block = max(1, min(num_images, self.settings.pair_chunk_size // captions_per_block))
        rows, num_patches = image.sparse_logits.shape[1:]
        width = image.patches.shape[-1]
        dtype, device = image.patches.dtype, image.patches.device
        logits = image.sparse_logits
        # float32 at least, so that the normalisation below neither underflows nor rounds in half precision.
        exp_logits = logits.float()
        exp_logits = torch.exp(exp_logits - exp_logits.amax(dim=-1, keepdim=True))  # (B_v, N_c, N)
        buffers = None
        if not torch.is_grad_enabled():
            pairs = images_per_block * captions_per_block
            buffers = (
                torch.empty(pairs * (rows + 1) * num_patches, dtype=dtype, device=device),
                torch.empty(pairs * (rows + 1) * width, dtype=dtype, device=device),
            )
        sim_rows = []
        for v0 in range(0, num_images, images_per_block):
            images = slice(v0, min(v0 + images_per_block, num_images))
            sim_blocks = []
            for t0 in range(0, num_captions, captions_per_block):
                captions = slice(t0, min(t0 + captions_per_block, num_captions))
                sim_blocks.append(self._budget_block(image, text, images, captions, exp_logits, buffers))
            sim_rows.append(torch.cat(sim_blocks, dim=1))
        return torch.cat(sim_rows, dim=0)

    def _budget_block(
        self,
        image: _ImageSide,
        text: _TextSide,
        images: slice,
        captions: slice,
        exp_logits: torch.Tensor,
        buffers: Optional[Tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """``(V, T)`` similarities of a block, each pair keeping its ``num_keep`` best-scoring patches."""
        patches = image.patches[images]  # (V, N, C)
        words = text.unit_words[captions]  # (T, L, C)
        num_v, num_patches, width = patches.shape
        num_t, num_words = words.shape[:2]
        logits, exp_logits = image.sparse_logits[images], exp_logits[images]  # (V, N_c, N)
        rows = logits.shape[1]
        unit64 = image.unit_patches[images].double()
        directions = text.direction64[captions].expand(num_v, num_t, width)
        relevance = torch.bmm(directions, unit64.transpose(1, 2))  # (V, T, N) float64
        score = self._sparse_score(image, images, relevance)
        keep = top_mask(score, self.settings.num_keep)
        extra_weights = self._selection_weights(score, None, keep)[1].to(patches.dtype)  # (V, T, N)
        if image.dense_extra is not None:  # paper Eq. 4: the extra token is the two branches' mean
            extra_weights = (extra_weights + image.dense_extra[images, None]) / 2

        # Aggregation weights, the softmax of the logits over each pair's kept patches: keep * e / (keep @ e);
        # row N_c of each pair holds the extra token's weights.
        keep_f = keep.to(exp_logits.dtype)
        total = torch.bmm(keep_f, exp_logits.transpose(1, 2))[..., None]  # (V, T, N_c, 1) float32
        shape = (num_v, num_t, rows + 1, num_patches)
        if buffers is None:
            aggregation = (exp_logits[:, None] / total * keep_f[:, :, None, :]).to(patches.dtype)
            weights = torch.cat([aggregation, extra_weights[:, :, None, :]], dim=2)
        else:
            weights = buffers[0][: math.prod(shape)].view(shape)
            torch.div(exp_logits[:, None], total, out=weights[:, :, :rows]).mul_(keep_f[:, :, None, :])
            weights[:, :, rows].copy_(extra_weights)
        # Where every kept logit is far below the image's largest, e underflows: the masked softmax instead.
        if bool((total < _UNDERFLOW).any()):
            which = (total < _UNDERFLOW).flatten(2).any(dim=-1).nonzero()  # (pairs, 2): (v, t) in the block
            exact = self._masked_softmax(logits[which[:, 0]], keep[which[:, 0], which[:, 1]])
            weights[which[:, 0], which[:, 1], :rows] = exact.to(weights.dtype)
        if image.dense_aggregation is not None:  # paper Eq. 4: sparse and dense aggregations summed
            dense = image.dense_aggregation[images, None]
            if buffers is None:
                weights = torch.cat([weights[:, :, :rows] + dense, weights[:, :, rows:]], dim=2)
            else:
                weights[:, :, :rows].add_(dense)
        flat = weights.view(num_v, -1, num_patches)
        if buffers is None:
            tokens = torch.bmm(flat, patches)
        else:
            tokens = torch.bmm(flat, patches, out=buffers[1][: flat.shape[1] * num_v * width].view(num_v, -1, width))
        tokens = tokens.view(num_v, num_t, rows + 1, width)

        # Cosines with the caption's words, word-major (V, T, L, N_c + 1): dot products over the token norms.
        # One matmul per image: a broadcast over images would copy the words for every image.
        cosines = torch.stack([torch.bmm(words, tokens[v].transpose(1, 2)) for v in range(num_v)])
        cosines = cosines.div_(tokens.norm(dim=-1).clamp_min(1e-12)[:, :, None, :])
        if image.cls is not None:
            unit_cls = F.normalize(image.cls[images, 0], dim=-1)  # (V, C)
            cls_cosines = torch.mm(words.reshape(-1, width), unit_cls.t())  # (T * L, V)
            cls_cosines = cls_cosines.view(num_t, num_words, num_v).permute(2, 0, 1).unsqueeze(-1)
            cosines = torch.cat([cls_cosines, cosines], dim=-1)
        mask, counts = text.word_mask[captions], text.word_counts[captions]
        sims = self._similarity(cosines.transpose(2, 3), mask, counts)
        if image.dense_tokens is not None:
            dense_cosines = torch.einsum("vmc,tlc->vtml", image.dense_tokens[images], words)
            sims = sims + self._similarity(dense_cosines, mask, counts)
        return sims

    @staticmethod
    def _masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``(P, N_c, N)`` softmax of ``logits (P, N_c, N)`` over the patches ``keep (P, N)`` marks, in float32."""
        return torch.where(keep[:, None, :], logits.float(), float("-inf")).softmax(dim=-1)

    def _similarity(self, cosines: torch.Tensor, word_mask: torch.Tensor, word_counts: torch.Tensor) -> torch.Tensor:
        """``(V, T)`` :func:`~lever_plugins.modules.seps_similarity.fine_grained_similarity` of this version."""
        paper = self.settings.use_paper_version
        return fine_grained_similarity(
            cosines, word_mask, word_counts, self.relevance_mlp if paper else None, self.settings.top_k
        )

    def extra_repr(self) -> str:
        s = self.settings
        return f"{s!r}, num_keep={s.num_keep}, num_aggregated={s.num_aggregated}"
