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

**Keep decisions decide.** A fixed top-k budget makes the kept fraction a constant, so a ratio loss
on the top-k mask (the public code) has no gradient and changes nothing. Here each branch turns its
selection score ``s`` into per-patch decisions: logit ``z = (s - m - theta) / 0.1`` with ``m`` the
midpoint between the pair's ``num_keep``-th and next best score and ``theta`` a learned offset per
branch (0 at start, so the decisions start as the budget's top-``num_keep`` set); forward ``D = [z >
0]``, backward the gradient of ``sigmoid(z)`` (straight-through). With ``use_gumbel_softmax``, in
training, ``z`` gets two-way Gumbel (logistic) noise and the backward is that of ``sigmoid(z /
gumbel_tau)`` (seed default ``gumbel_tau = 1``). The best-scoring patch is always kept and the worst
always fused, so neither token set is ever empty.

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
count per pair) takes a faster route to the same numbers: ``e = exp(logits - max)`` once per image, the
masked softmax of each pair as ``keep * e / (keep @ e)`` (a pair whose kept sum underflows takes the exact
masked softmax), the extra token's weights as one more row, so that one batched matmul gives every
pair's tokens and one more their cosines with the words, in buffers allocated once per forward. Training
memory grows with ``B_v * B_t`` because autograd keeps every block's intermediates (measured ~250 kB per
pair at the defaults: +4.2 GB for a 128 x 128 batch); ``checkpoint_pairs=True`` recomputes each block
in the backward pass instead (+0.6 GB at 128 x 128, 1.2-1.5x the CPU time).

Shapes: ``B_v`` images, ``B_t`` captions, ``N`` patches, ``C`` = ``embed_size``, ``L_s``/``L_d`` words.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lever_plugins.modules.seps_loss import SEPSLoss, ScoreMask
from lever_plugins.schema import settings_from
from lever_plugins.schemas.seps import AGGREGATION_HIDDEN_RATIO, SepsHeadSettings

__all__ = ["CrossSparseAggrNet", "SEPSLoss", "ScoreMask"]

KEEP_TEMPERATURE = 0.1
SCAN_LEAKY_SLOPE = 0.1
# Evaluation normalises exp(logit - image max) over each pair's kept patches; a pair whose kept sum falls
# below this (float32 subnormals are 1e13 times smaller) takes the exact masked softmax instead.
_UNDERFLOW = 1e-25
# Images (or captions) processed at once by the per-item work (float64 scores, MLPs on every patch),
# so that its temporaries stay small (a few MB: fresh large tensors cost page faults) even when all
# test images come at once.
_ITEM_CHUNK = 16


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise over the last dim (paper Eq. 2)."""
    low = x.amin(dim=-1, keepdim=True)
    high = x.amax(dim=-1, keepdim=True)
    return (x - low) / (high - low + 1e-8)


def _mean_direction64(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
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


def _cosine64(unit_patches: torch.Tensor, *unit_queries: torch.Tensor) -> Tuple[torch.Tensor, ...]:
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


def _per_item(fn: Any, x: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to ``x`` in chunks of ``_ITEM_CHUNK`` along dim 0, results concatenated."""
    if x.shape[0] <= _ITEM_CHUNK:
        return fn(x)
    return torch.cat([fn(x[i : i + _ITEM_CHUNK]) for i in range(0, x.shape[0], _ITEM_CHUNK)], dim=0)


def _top_mask(score: torch.Tensor, k: int) -> torch.Tensor:
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


def _policy_softmax(x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Softmax of ``x`` over the last dim restricted to the entries where ``policy`` (0/1 values) is 1.

    ``policy_i exp(x_i) / sum_j policy_j exp(x_j)``: in the forward pass exactly the masked softmax,
    and a gradient reaches ``policy`` (straight-through decisions), as DynamicViT's attention with a
    keep policy. ``policy`` broadcasts to ``x`` and has at least one 1 per row.
    """
    return _PolicySoftmax.apply(x, policy)


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
        embed_size: width ``C`` of patch and word embeddings.
        num_patches: patch tokens ``N`` per image, CLS excluded; must match the input.
        sparse_ratio: fraction ``rho`` of patches kept per pair: ``ceil(N * rho)`` in evaluation, the
            decisions' starting point in training.
        aggr_ratio: kept patches are aggregated into ``int(N * aggr_ratio * rho)`` tokens.
        use_paper_version: SEPS-paper scoring and similarity, else the public-code ones (module docstring).
        use_dual_aggr: joint sparse+dense aggregation (tuple score mask), else per-branch (tensor).
        use_gumbel_softmax: in training, sample keep decisions with two-way Gumbel noise.
        gumbel_tau: Gumbel temperature of the decisions' backward pass (seed default 1.0).
        selection_score_grad: let the guidance cosines of the selection scores pass gradient (default:
            computed without gradient, as LAPS/SEPS do).
        eval_by_decisions: evaluation keeps the decisions' patches instead of the ``num_keep`` best.
        beta: paper Eq. 3 mixing weight, in ``[0, 0.5]``.
        top_k: paper similarity: number of best matches fed to the relevance MLP.
        has_cls: the first image token is a CLS token (explicit; never guessed from the token count).
        pair_chunk_size: pairs scored at once; bounds memory, never changes the result.
        checkpoint_pairs: in training, recompute each block of pairs in the backward pass instead of
            keeping its intermediates (~190 kB per pair at the defaults otherwise).

    Raises:
        ValueError: a value out of range (see :class:`SepsHeadSettings`).
    """

    def __init__(
        self,
        embed_size: int = 512,
        num_patches: int = 196,
        sparse_ratio: float = 0.5,
        aggr_ratio: float = 0.4,
        use_paper_version: bool = True,
        use_dual_aggr: bool = True,
        use_gumbel_softmax: bool = False,
        beta: float = 0.25,
        top_k: int = 5,
        has_cls: bool = True,
        pair_chunk_size: int = 256,
        checkpoint_pairs: bool = False,
        gumbel_tau: float = 1.0,
        selection_score_grad: bool = False,
        eval_by_decisions: bool = False,
    ) -> None:
        super().__init__()
        settings = SepsHeadSettings(
            embed_size=embed_size,
            num_patches=num_patches,
            has_cls=has_cls,
            sparse_ratio=sparse_ratio,
            aggr_ratio=aggr_ratio,
            use_paper_version=use_paper_version,
            use_dual_aggr=use_dual_aggr,
            use_gumbel_softmax=use_gumbel_softmax,
            gumbel_tau=gumbel_tau,
            selection_score_grad=selection_score_grad,
            eval_by_decisions=eval_by_decisions,
            beta=beta,
            top_k=top_k,
            pair_chunk_size=pair_chunk_size,
            checkpoint_pairs=checkpoint_pairs,
        )
        self.embed_size = embed_size
        self.num_patches = num_patches
        self.has_cls = bool(has_cls)
        self.sparse_ratio = float(sparse_ratio)
        self.aggr_ratio = float(aggr_ratio)
        self.use_paper_version = bool(use_paper_version)
        self.use_dual_aggr = bool(use_dual_aggr)
        self.use_gumbel_softmax = bool(use_gumbel_softmax)
        self.gumbel_tau = float(gumbel_tau)
        self.selection_score_grad = bool(selection_score_grad)
        self.eval_by_decisions = bool(eval_by_decisions)
        self.beta = float(beta)
        self.top_k = int(top_k)
        self.pair_chunk_size = int(pair_chunk_size)
        self.checkpoint_pairs = bool(checkpoint_pairs)
        self.num_keep = settings.num_keep
        self.num_aggregated = settings.num_aggregated

        if self.use_dual_aggr:
            self.sparse_aggregation = _aggregation_mlp(embed_size, self.num_aggregated)
            self.dense_aggregation = _aggregation_mlp(embed_size, self.num_aggregated)
        else:
            self.aggregation = _aggregation_mlp(embed_size, self.num_aggregated)
        self.aggregation_scale = nn.Parameter(torch.ones(()))
        if self.use_paper_version:
            self.sparse_score_predictor = _score_predictor(embed_size)
            self.dense_score_predictor = _score_predictor(embed_size)
            self.relevance_mlp = nn.Sequential(
                nn.Linear(self.top_k, 2 * self.top_k),
                nn.GELU(),
                # No bias: a constant added to every score cancels in any ranking loss (it would never train).
                nn.Linear(2 * self.top_k, 1, bias=False),
            )
        # Offsets of the decision threshold from the budget's cut (0: start at the top-num_keep set).
        self.sparse_keep_threshold = nn.Parameter(torch.zeros(()))
        self.dense_keep_threshold = nn.Parameter(torch.zeros(()))

    @classmethod
    def from_settings(cls, settings: Union[SepsHeadSettings, Mapping[str, Any], None]) -> "CrossSparseAggrNet":
        """Build from a :class:`SepsHeadSettings`, a mapping of its keys (recipe block) or ``None`` (defaults).

        Raises:
            ValueError: unknown keys or bad values (all problems listed).
        """
        s = settings_from(SepsHeadSettings, settings, "seps_head")
        return cls(**{field.name: getattr(s, field.name) for field in dataclasses.fields(s)})

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
        cap_lens, long_cap_lens = self._check_inputs(img_embs, cap_embs, cap_lens, long_cap_embs, long_cap_lens)
        need_mask = self.training
        decide = self.training or self.eval_by_decisions
        image = self._encode_images(img_embs, long_cap_embs, long_cap_lens, decide)
        text = self._encode_captions(cap_embs, cap_lens)
        if not decide:
            return self._budget_similarities(image, text)

        num_images, num_captions = img_embs.shape[0], cap_embs.shape[0]
        captions_per_block = min(num_captions, self.pair_chunk_size)
        images_per_block = max(1, min(num_images, self.pair_chunk_size // captions_per_block))
        checkpointed = need_mask and self.checkpoint_pairs and torch.is_grad_enabled()
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
        if self.use_dual_aggr:
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
        name = type(self).__name__
        c = self.embed_size
        if img_embs.dim() != 3 or img_embs.shape[-1] != c:
            raise ValueError(
                f"{name}: img_embs must be (B_v, N(+1), embed_size={c}), got shape {tuple(img_embs.shape)}"
            )
        if cap_embs.dim() != 3 or cap_embs.shape[-1] != c:
            raise ValueError(
                f"{name}: cap_embs must be (B_t, L_s, embed_size={c}), got shape {tuple(cap_embs.shape)}"
            )
        patches = img_embs.shape[1] - int(self.has_cls)
        if patches != self.num_patches:
            hint = (
                "set has_cls=False if the tokens carry no CLS token"
                if self.has_cls
                else "set has_cls=True if the first token is a CLS token"
            )
            raise ValueError(
                f"{name}: img_embs has {img_embs.shape[1]} tokens, i.e. {patches} patches with "
                f"has_cls={self.has_cls}, but the head was built for num_patches={self.num_patches}; "
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

    def _keep_decision(self, score: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Keep decisions ``D (..., N)`` from selection scores: 0/1 forward, straight-through backward.

        ``z = (score - m - offset) / KEEP_TEMPERATURE`` with ``m`` the midpoint between the
        ``num_keep``-th and the next best score (``offset = 0``: exactly the budget's top set); Gumbel
        noise in training when ``use_gumbel_softmax``. The best patch is always kept and the worst
        always dropped (these two carry no gradient).
        """
        top = score.topk(self.num_keep + 1, dim=-1).values  # descending
        logit = (score - (top[..., -2:-1] + top[..., -1:]) / 2 - offset.double()) / KEEP_TEMPERATURE
        if self.training and self.use_gumbel_softmax:
            uniform = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
            logit = logit + torch.log(uniform) - torch.log1p(-uniform)  # two-way Gumbel = logistic noise
            prob = torch.sigmoid(logit / self.gumbel_tau)
        else:
            prob = torch.sigmoid(logit)
        prob = prob.to(offset.dtype)
        with torch.no_grad():
            best = score.argmax(dim=-1, keepdim=True)
            worst = score.scatter(-1, best, float("inf")).argmin(dim=-1, keepdim=True)
            free = torch.ones_like(prob).scatter_(-1, best, 0.0).scatter_(-1, worst, 0.0)
            hard = (logit > 0).to(prob.dtype).scatter_(-1, best, 1.0).scatter_(-1, worst, 0.0)
        return hard + (prob - prob.detach()) * free

    def _select(self, score: torch.Tensor, offset: torch.Tensor, decide: bool) -> torch.Tensor:
        """Kept patches: the decisions (float 0/1, differentiable) or the budget's top set (bool)."""
        return self._keep_decision(score, offset) if decide else _top_mask(score, self.num_keep)

    def _predicted_scores(self, predictor: nn.Module, patches: torch.Tensor) -> torch.Tensor:
        """Paper Eq. 1: ``sigmoid(MLP(patch))``, ``(B, N)`` float64."""
        return _per_item(lambda x: torch.sigmoid(predictor(x).squeeze(-1)).double(), patches)

    def _aggregation_logits(self, mlp: nn.Module, patches: torch.Tensor) -> torch.Tensor:
        """Aggregation logits of every patch, ``(B, N_c, N)``."""
        # Contiguous so that the per-pair masked softmax over patches runs on standard-layout memory.
        return _per_item(lambda x: (mlp(x) * self.aggregation_scale).transpose(1, 2).contiguous(), patches)

    def _encode_images(
        self,
        img_embs: torch.Tensor,
        long_cap_embs: Optional[torch.Tensor],
        long_cap_lens: Optional[torch.Tensor],
        decide: bool,
    ) -> _ImageSide:
        cls = img_embs[:, :1] if self.has_cls else None
        patches = img_embs[:, 1:] if self.has_cls else img_embs
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.selection_score_grad):
            unit_patches = F.normalize(patches, dim=-1)
            image_direction = F.normalize(_per_item(lambda x: x.double().mean(dim=1), patches), dim=-1)
            dense_relevance = None
            if long_cap_embs is None:
                (saliency,) = _cosine64(unit_patches, image_direction)  # s_im, (B_v, N)
            else:  # s_im and s_dt
                dense_direction = _mean_direction64(long_cap_embs, long_cap_lens)
                saliency, dense_relevance = _cosine64(unit_patches, image_direction, dense_direction)

        beta = self.beta
        if self.use_paper_version:
            saliency_n = _minmax(saliency)
            sparse_base = (1 - 2 * beta) * self._predicted_scores(self.sparse_score_predictor, patches)
            sparse_base = sparse_base + beta * 2 * saliency_n
            if dense_relevance is not None:
                sparse_base = sparse_base + beta * _minmax(dense_relevance)
        else:
            sparse_base = saliency
        sparse_mlp = self.sparse_aggregation if self.use_dual_aggr else self.aggregation
        sparse_logits = self._aggregation_logits(sparse_mlp, patches)

        dense_aggregation = dense_extra = dense_tokens = dense_decision = None
        if dense_relevance is not None:
            if self.use_paper_version:
                dense_score = (1 - 2 * beta) * self._predicted_scores(self.dense_score_predictor, patches)
                dense_score = dense_score + beta * 2 * (_minmax(dense_relevance) + saliency_n)
            else:
                dense_score = saliency + dense_relevance
            dense_mlp = self.dense_aggregation if self.use_dual_aggr else self.aggregation
            dense_logits = self._aggregation_logits(dense_mlp, patches)
            keep = self._select(dense_score, self.dense_keep_threshold, decide)
            dense_aggregation, dense_extra = self._selection_weights(dense_score, dense_logits, keep)
            if not self.use_dual_aggr:
                dense_tokens = self._dense_tokens(dense_aggregation, dense_extra, patches, cls)
                dense_aggregation = dense_extra = None
            if decide:
                dense_decision = keep
        return _ImageSide(
            patches,
            cls,
            unit_patches,
            sparse_base,
            sparse_logits,
            dense_aggregation,
            dense_extra,
            dense_tokens,
            dense_decision,
        )

    def _encode_captions(self, cap_embs: torch.Tensor, cap_lens: torch.Tensor) -> _TextSide:
        word_mask = torch.arange(cap_embs.shape[1], device=cap_embs.device)[None, :] < cap_lens[:, None]
        return _TextSide(
            unit_words=F.normalize(cap_embs, dim=-1),
            word_mask=word_mask,
            word_counts=cap_lens.to(cap_embs.dtype),
            direction64=_mean_direction64(cap_embs, cap_lens) if self.selection_score_grad
            else _mean_direction64(cap_embs.detach(), cap_lens),
        )

    def _selection_weights(
        self, score: torch.Tensor, logits: Optional[torch.Tensor], keep: torch.Tensor
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """Aggregation and extra-token weights over all ``N`` patches (zero where not applicable).

        Every path that chooses kept patches passes its choice through here (tests record ``keep``).

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
        return _policy_softmax(logits, keep.unsqueeze(-2)), _policy_softmax(score.to(logits.dtype), 1 - keep)

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
        if self.use_paper_version:
            score = image.sparse_base[images, None] + self.beta * _minmax(relevance)
        else:
            score = image.sparse_base[images, None] + relevance
        keep = self._select(score, self.sparse_keep_threshold, decide)
        aggregation, extra = self._selection_weights(score, image.sparse_logits[images, None], keep)
        if image.dense_aggregation is not None:
            # Paper Eq. 4: sparse and dense aggregations summed; the extra token is the two branches' mean.
            aggregation = aggregation + image.dense_aggregation[images, None]
            extra = (extra + image.dense_extra[images, None]) / 2
        patches, words = image.patches[images], text.unit_words[captions]  # (v, N, C), (t, L, C)
        num_v, num_t, rows, num_patches = aggregation.shape
        cosines = [
            self._pair_cosines(aggregation.view(num_v, num_t * rows, num_patches), patches, words),
            self._pair_cosines(extra, patches, words),
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
        captions_per_block = min(num_captions, self.pair_chunk_size)
        images_per_block = max(1, min(num_images, self.pair_chunk_size // captions_per_block))
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
        if self.use_paper_version:
            score = image.sparse_base[images, None] + self.beta * _minmax(relevance)
        else:
            score = image.sparse_base[images, None] + relevance
        keep = _top_mask(score, self.num_keep)
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

    @staticmethod
    def _pair_cosines(weights: torch.Tensor, patches: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
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

    def _similarity(self, cosines: torch.Tensor, word_mask: torch.Tensor, word_counts: torch.Tensor) -> torch.Tensor:
        """Fine-grained similarity from token-word cosines.

        Args:
            cosines: ``(V, T, M, L)`` cosine of each of the pair's ``M`` tokens with each word.
            word_mask: ``(T, L)`` True for real words.
            word_counts: ``(T,)``.

        Returns:
            ``(V, T)``: mean over words of each word's best token + mean over tokens of each token's best
            word (+ the relevance MLP on the top-k of both, paper version).
        """
        if not self.use_paper_version:
            cosines = F.leaky_relu(cosines, SCAN_LEAKY_SLOPE)
        valid = word_mask[None]  # (1, T, L)
        word_best = cosines.amax(dim=2)  # (V, T, L)
        word_term = (word_best * valid).sum(dim=-1) / word_counts
        token_best = cosines.masked_fill(~valid[:, :, None, :], float("-inf")).amax(dim=3)  # (V, T, M)
        sims = word_term + token_best.mean(dim=-1)
        if self.use_paper_version:
            sims = sims + self._relevance(word_best.masked_fill(~valid, float("-inf"))) + self._relevance(token_best)
        return sims

    def _relevance(self, best: torch.Tensor) -> torch.Tensor:
        """Relevance MLP on the ``top_k`` best matches (``-inf`` = absent, counted as 0; padded with 0)."""
        top = best.topk(min(self.top_k, best.shape[-1]), dim=-1).values
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        if top.shape[-1] < self.top_k:
            top = F.pad(top, (0, self.top_k - top.shape[-1]))
        return self.relevance_mlp(top).squeeze(-1)

    def extra_repr(self) -> str:
        return (
            f"embed_size={self.embed_size}, num_patches={self.num_patches}, has_cls={self.has_cls}, "
            f"sparse_ratio={self.sparse_ratio}, aggr_ratio={self.aggr_ratio}, num_keep={self.num_keep}, "
            f"num_aggregated={self.num_aggregated}, use_paper_version={self.use_paper_version}, "
            f"use_dual_aggr={self.use_dual_aggr}, use_gumbel_softmax={self.use_gumbel_softmax}, "
            f"gumbel_tau={self.gumbel_tau}, selection_score_grad={self.selection_score_grad}, "
            f"eval_by_decisions={self.eval_by_decisions}, "
            f"beta={self.beta}, top_k={self.top_k}, pair_chunk_size={self.pair_chunk_size}, "
            f"checkpoint_pairs={self.checkpoint_pairs}"
        )
