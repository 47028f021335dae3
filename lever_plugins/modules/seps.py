"""SEPS retrieval head (pure torch): text-guided patch selection, aggregation and fine-grained similarity.

``CrossSparseAggrNet`` scores every (image v, caption t) pair of a batch; ``SEPSLoss`` trains it.
Lineage: LAPS (CVPR 2024) and SEPS (2025, adds a dense MLLM-written caption per image). For one pair:

1. **Selection.** Each patch ``i`` of image ``v`` gets a score from image self-saliency ``s_im`` (cosine
   to the image's mean patch), text relevance ``s_st`` (cosine to the caption's mean word) and dense
   relevance ``s_dt`` (cosine to the mean word of *image v's* dense caption). The top
   ``num_keep = ceil(N * sparse_ratio)`` patches are kept; the dropped ones are fused into one extra
   token, weighted by the softmax of their scores.
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

**Differentiable keep decisions.** With a fixed top-k budget the kept fraction is a constant, so a ratio
loss on the top-k mask (the public code) has no gradient. The decision matrix ``D`` returned here is
instead each selector's own per-patch keep decision: keep probability ``p = sigmoid((s - theta) / 0.1)``
with ``s`` the selection score and ``theta`` a learned threshold per branch; the forward value is the
hard decision ``p > 0.5`` (with ``use_gumbel_softmax``, in training, a two-way Gumbel sample:
``logit + logistic noise > 0``) and the backward pass goes through ``p`` (straight-through estimator).
``mean(D) - rho`` is therefore a real, varying quantity: the ratio term trains ``theta`` and, in the
paper version, the score predictors (and the embeddings) so that the selector's decision boundary
falls at the kept budget; the forward itself always keeps exactly ``num_keep`` patches (static shapes,
batched). In the simplified version the threshold is the selector's only parameter, so there the ratio
term is a calibration of ``theta`` and nothing else.

**Cost.** Work that depends only on the image (self-saliency, score predictors, aggregation logits,
the whole dense branch) or only on the caption is done once; the per-pair work (text relevance, top-k,
masked softmax, one batched matmul, similarity) runs over blocks of at most ``pair_chunk_size`` pairs,
with no Python loop over captions. A pair's score does not depend on the rest of the batch: selection
scores are computed in float64, so chunking or sub-batching cannot flip a top-k choice through
rounding. Training memory grows with ``B_v * B_t`` because autograd keeps every block's intermediates
(measured ~190 kB per pair at the defaults: +3 GB for a 128 x 128 batch); ``checkpoint_pairs=True``
recomputes each block in the backward pass instead (+0.6 GB at 128 x 128, 1.2-1.5x the CPU time).

Shapes: ``B_v`` images, ``B_t`` captions, ``N`` patches, ``C`` = ``embed_size``, ``L_s``/``L_d`` words.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lever_plugins.schema import settings_from
from lever_plugins.schemas.seps import AGGREGATION_HIDDEN_RATIO, SepsHeadSettings, SepsLossSettings

__all__ = ["CrossSparseAggrNet", "SEPSLoss", "ScoreMask", "per_caption_loop_similarity"]

ScoreMask = Union[torch.Tensor, Tuple[torch.Tensor, ...]]

KEEP_TEMPERATURE = 0.1
SCAN_LEAKY_SLOPE = 0.1
# Images (or captions) processed at once by the per-item work (float64 scores, MLPs on every patch),
# so that its temporaries stay a small multiple of 64 images even when all test images come at once.
_ITEM_CHUNK = 64


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


def _cosine64(unit_patches: torch.Tensor, unit_queries: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` float64 cosine of each image's patches to that image's own query direction.

    Args:
        unit_patches: ``(B, N, C)`` unit-norm patches.
        unit_queries: ``(B, C)`` unit-norm float64 query per image.
    """
    out = []
    for start in range(0, unit_patches.shape[0], _ITEM_CHUNK):
        block = unit_patches[start : start + _ITEM_CHUNK].double()
        out.append((block * unit_queries[start : start + _ITEM_CHUNK, None, :]).sum(dim=-1))
    return torch.cat(out, dim=0)


def _per_item(fn: Any, x: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to ``x`` in chunks of ``_ITEM_CHUNK`` along dim 0, results concatenated."""
    if x.shape[0] <= _ITEM_CHUNK:
        return fn(x)
    return torch.cat([fn(x[i : i + _ITEM_CHUNK]) for i in range(0, x.shape[0], _ITEM_CHUNK)], dim=0)


def _top_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` highest entries along the last dim."""
    index = score.topk(k, dim=-1, sorted=False).indices
    return torch.zeros(score.shape, dtype=torch.bool, device=score.device).scatter_(-1, index, True)


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
    dense_decision: Optional[torch.Tensor]  # training: (B_v, N) keep decisions D_d


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
        sparse_ratio: fraction ``rho`` of patches kept per pair (``ceil(N * rho)`` kept).
        aggr_ratio: kept patches are aggregated into ``int(N * aggr_ratio * rho)`` tokens.
        use_paper_version: SEPS-paper scoring and similarity, else the public-code ones (module docstring).
        use_dual_aggr: joint sparse+dense aggregation (tuple score mask), else per-branch (tensor).
        use_gumbel_softmax: in training, sample keep decisions with two-way Gumbel noise.
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
        # Paper scores lie in [0, 1 + 2 beta], raw public-code scores around 0: start mid-range.
        threshold = 0.5 + self.beta if self.use_paper_version else 0.0
        self.sparse_keep_threshold = nn.Parameter(torch.tensor(threshold))
        self.dense_keep_threshold = nn.Parameter(torch.tensor(threshold))

    @classmethod
    def from_settings(cls, settings: Union[SepsHeadSettings, Mapping[str, Any], None]) -> "CrossSparseAggrNet":
        """Build from a :class:`SepsHeadSettings`, a mapping of its keys (recipe block) or ``None`` (defaults).

        Raises:
            ValueError: unknown keys or bad values (all problems listed).
        """
        s = settings_from(SepsHeadSettings, settings, "seps_head")
        return cls(
            embed_size=s.embed_size,
            num_patches=s.num_patches,
            sparse_ratio=s.sparse_ratio,
            aggr_ratio=s.aggr_ratio,
            use_paper_version=s.use_paper_version,
            use_dual_aggr=s.use_dual_aggr,
            use_gumbel_softmax=s.use_gumbel_softmax,
            beta=s.beta,
            top_k=s.top_k,
            has_cls=s.has_cls,
            pair_chunk_size=s.pair_chunk_size,
            checkpoint_pairs=s.checkpoint_pairs,
        )

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
            Eval mode: ``sims (B_v, B_t)``. Training mode: ``(sims, score_mask)`` with ``score_mask`` the
            keep decisions ``(D_s, D_d)``, each ``(B_t, B_v, N)``, when ``use_dual_aggr`` and dense captions
            are given, else one ``(B_t, B_v, N)`` tensor (module docstring).
        """
        cap_lens, long_cap_lens = self._check_inputs(img_embs, cap_embs, cap_lens, long_cap_embs, long_cap_lens)
        need_mask = self.training
        image = self._encode_images(img_embs, long_cap_embs, long_cap_lens, need_mask)
        text = self._encode_captions(cap_embs, cap_lens)

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
                        self._score_block, image, text, images, captions, need_mask, use_reentrant=False
                    )
                else:
                    sims, decision = self._score_block(image, text, images, captions, need_mask)
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

    def _keep_decision(self, score: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """Straight-through keep decisions: forward value 0/1, gradient of the keep probability."""
        logit = (score.to(threshold.dtype) - threshold) / KEEP_TEMPERATURE
        if self.training and self.use_gumbel_softmax:
            uniform = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
            logit = logit + torch.log(uniform) - torch.log1p(-uniform)  # two-way Gumbel = logistic noise
        prob = torch.sigmoid(logit)
        hard = (logit > 0).to(prob.dtype)
        return hard + (prob - prob.detach())  # exactly 0/1 forward, gradient of prob

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
        need_mask: bool,
    ) -> _ImageSide:
        cls = img_embs[:, :1] if self.has_cls else None
        patches = img_embs[:, 1:] if self.has_cls else img_embs
        unit_patches = F.normalize(patches, dim=-1)
        image_direction = F.normalize(_per_item(lambda x: x.double().mean(dim=1), patches), dim=-1)
        saliency = _cosine64(unit_patches, image_direction)  # s_im, (B_v, N)
        dense_relevance = None
        if long_cap_embs is not None:
            dense_relevance = _cosine64(unit_patches, _mean_direction64(long_cap_embs, long_cap_lens))  # s_dt

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
            dense_aggregation, dense_extra = self._selection_weights(dense_score, dense_logits)
            if not self.use_dual_aggr:
                dense_tokens = self._dense_tokens(dense_aggregation, dense_extra, patches, cls)
                dense_aggregation = dense_extra = None
            if need_mask:
                dense_decision = self._keep_decision(dense_score, self.dense_keep_threshold)
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
            direction64=_mean_direction64(cap_embs, cap_lens),
        )

    def _selection_weights(self, score: torch.Tensor, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Aggregation and extra-token weights over all ``N`` patches (zero where not applicable).

        Args:
            score: ``(..., N)`` float64 selection score.
            logits: ``(..., N_c, N)`` aggregation logits (broadcastable to ``score``'s leading dims).

        Returns:
            ``aggregation (..., N_c, N)``: softmax of the logits over the kept patches;
            ``extra (..., N)``: softmax of the dropped patches' scores.
        """
        keep = _top_mask(score, self.num_keep)
        aggregation = torch.where(keep.unsqueeze(-2), logits, float("-inf")).softmax(dim=-1)
        extra = torch.where(keep, float("-inf"), score.to(logits.dtype)).softmax(dim=-1)
        return aggregation, extra

    def _dense_tokens(
        self, aggregation: torch.Tensor, extra: torch.Tensor, patches: torch.Tensor, cls: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """Unit-norm per-image tokens ``[CLS, aggregation @ patches, extra @ patches]``, ``(B, M, C)``."""
        tokens = [torch.bmm(aggregation, patches), torch.bmm(extra.unsqueeze(1), patches)]
        if cls is not None:
            tokens.insert(0, cls)
        return F.normalize(torch.cat(tokens, dim=1), dim=-1)

    def _score_block(
        self, image: _ImageSide, text: _TextSide, images: slice, captions: slice, need_mask: bool
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Similarities ``(v, t)`` and sparse keep decisions ``(v, t, N)`` for one block of pairs."""
        relevance = torch.einsum("vnc,tc->vtn", image.unit_patches[images].double(), text.direction64[captions])
        if self.use_paper_version:
            score = image.sparse_base[images, None] + self.beta * _minmax(relevance)
        else:
            score = image.sparse_base[images, None] + relevance
        aggregation, extra = self._selection_weights(score, image.sparse_logits[images, None])
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
        decision = self._keep_decision(score, self.sparse_keep_threshold) if need_mask else None
        return sims, decision

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
            f"beta={self.beta}, top_k={self.top_k}, pair_chunk_size={self.pair_chunk_size}, "
            f"checkpoint_pairs={self.checkpoint_pairs}"
        )


class SEPSLoss(nn.Module):
    """Hinge triplet alignment in both directions plus the selection-ratio term.

    ``total = align + ratio_weight * ratio``.

    *Alignment.* Every caption ``j`` has one anchor pair ``(a(j), j)`` with its image row ``a(j)``:

    * ``img_ids=None``: square matrix, ``a(j) = j``; positives are the diagonal.
    * square matrix (``B_v == B_t``) with ``img_ids``: the seed convention, rows and columns are the
      same batch of (image, caption) samples, ``img_ids[i]`` the image id of sample ``i`` (duplicates
      allowed); ``a(j) = j``; ``(i, j)`` is positive when ``img_ids[i] == img_ids[j]``.
    * rectangular matrix: rows are unique images, ``img_ids[j]`` is the row of caption ``j``'s image
      (``0 <= img_ids[j] < B_v``); ``a(j) = img_ids[j]``; ``(i, j)`` positive when ``i == img_ids[j]``.

    For each anchor, image-to-text costs ``[margin + S(a(j), j') - S(a(j), j)]_+`` over captions ``j'``
    and text-to-image costs ``[margin + S(i, j) - S(a(j), j)]_+`` over images ``i``; positives are
    never counted as negatives. Costs are summed, or with ``max_violation`` only the hardest negative
    per anchor and direction is kept (VSE++). With unique rows and ``B_v == B_t``, order the captions
    so that caption ``j`` belongs to row ``j`` (the two conventions then agree).

    *Ratio.* For a tuple mask ``(D_s, D_d)``:
    ``lambda_sparse (mean D_s - rho)^2 + lambda_dense (mean D_d - rho)^2``; for a tensor
    ``(mean D - rho)^2``; for ``None`` 0.

    Args:
        margin: triplet margin.
        target_ratio: target kept fraction ``rho``.
        ratio_weight: weight of the ratio term.
        max_violation: hardest negative only.
        lambda_sparse: weight of the sparse-branch ratio term.
        lambda_dense: weight of the dense-branch ratio term.
    """

    def __init__(
        self,
        margin: float = 0.2,
        target_ratio: float = 0.5,
        ratio_weight: float = 2.0,
        max_violation: bool = False,
        lambda_sparse: float = 1.0,
        lambda_dense: float = 1.0,
    ) -> None:
        super().__init__()
        SepsLossSettings(
            margin=margin,
            target_ratio=target_ratio,
            ratio_weight=ratio_weight,
            max_violation=max_violation,
            lambda_sparse=lambda_sparse,
            lambda_dense=lambda_dense,
        )
        self.margin = float(margin)
        self.target_ratio = float(target_ratio)
        self.ratio_weight = float(ratio_weight)
        self.max_violation = bool(max_violation)
        self.lambda_sparse = float(lambda_sparse)
        self.lambda_dense = float(lambda_dense)

    @classmethod
    def from_settings(cls, settings: Union[SepsLossSettings, Mapping[str, Any], None]) -> "SEPSLoss":
        """Build from a :class:`SepsLossSettings`, a mapping of its keys, or ``None`` (defaults)."""
        s = settings_from(SepsLossSettings, settings, "seps_loss")
        return cls(
            margin=s.margin,
            target_ratio=s.target_ratio,
            ratio_weight=s.ratio_weight,
            max_violation=s.max_violation,
            lambda_sparse=s.lambda_sparse,
            lambda_dense=s.lambda_dense,
        )

    def set_max_violation(self, max_violation: bool = True) -> None:
        """Switch hard-negative mining on or off (the recipe switches it on after warm-up)."""
        self.max_violation = bool(max_violation)

    def forward(
        self,
        similarity_matrix: torch.Tensor,
        score_mask: Optional[ScoreMask],
        img_ids: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(total, align, ratio)``, all scalars.

        Args:
            similarity_matrix: ``(B_v, B_t)`` scores, rows images, columns captions.
            score_mask: keep decisions from the head in training mode (tuple, tensor) or None.
            img_ids: ``(B_t,)`` see the class docstring; None = one caption per image on the diagonal.
        """
        align = self.alignment_loss(similarity_matrix, img_ids)
        ratio = self.ratio_loss(score_mask, similarity_matrix)
        return align + self.ratio_weight * ratio, align, ratio

    def alignment_loss(self, similarity_matrix: torch.Tensor, img_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Summed hinge triplet loss in both directions (class docstring)."""
        sims = similarity_matrix
        if sims.dim() != 2:
            raise ValueError(f"SEPSLoss: similarity_matrix must be (B_v, B_t), got shape {tuple(sims.shape)}")
        num_images, num_captions = sims.shape
        columns = torch.arange(num_captions, device=sims.device)
        if img_ids is None:
            if num_images != num_captions:
                raise ValueError(
                    f"SEPSLoss: similarity_matrix is {num_images} x {num_captions}; without img_ids it must be "
                    "square (caption j belongs to image j). Pass img_ids (B_t,) = the row of each caption's image"
                )
            anchor_rows = columns
            positive = torch.eye(num_images, dtype=torch.bool, device=sims.device)
        else:
            img_ids = torch.as_tensor(img_ids, device=sims.device)
            if img_ids.dim() != 1 or img_ids.shape[0] != num_captions:
                raise ValueError(
                    f"SEPSLoss: img_ids must be (B_t,) = ({num_captions},), got shape {tuple(img_ids.shape)}"
                )
            if num_images == num_captions:
                anchor_rows = columns
                positive = img_ids[:, None] == img_ids[None, :]
            else:
                img_ids = img_ids.long()
                if int(img_ids.min()) < 0 or int(img_ids.max()) >= num_images:
                    raise ValueError(
                        f"SEPSLoss: with {num_images} image rows and {num_captions} captions, img_ids[j] must be "
                        f"the row (0..{num_images - 1}) of caption j's image; got values "
                        f"{int(img_ids.min())}..{int(img_ids.max())}"
                    )
                anchor_rows = img_ids
                positive = torch.arange(num_images, device=sims.device)[:, None] == img_ids[None, :]
        anchor = sims[anchor_rows, columns]  # (B_t,)
        image_to_text = (self.margin + sims[anchor_rows] - anchor[:, None]).clamp(min=0)  # (B_t anchors, B_t)
        image_to_text = image_to_text.masked_fill(positive[anchor_rows], 0)
        text_to_image = (self.margin + sims - anchor[None, :]).clamp(min=0)  # (B_v, B_t anchors)
        text_to_image = text_to_image.masked_fill(positive, 0)
        if self.max_violation:
            image_to_text = image_to_text.amax(dim=1)
            text_to_image = text_to_image.amax(dim=0)
        return image_to_text.sum() + text_to_image.sum()

    def ratio_loss(self, score_mask: Optional[ScoreMask], like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Squared gap between the mean keep decision and ``target_ratio`` (class docstring)."""
        rho = self.target_ratio
        if score_mask is None:
            return torch.zeros((), device=None if like is None else like.device)
        if isinstance(score_mask, (tuple, list)):
            if not 1 <= len(score_mask) <= 2:
                raise ValueError(f"SEPSLoss: a tuple score_mask must be (D_s,) or (D_s, D_d), got {len(score_mask)} items")
            loss = self.lambda_sparse * (score_mask[0].float().mean() - rho) ** 2
            if len(score_mask) == 2:
                loss = loss + self.lambda_dense * (score_mask[1].float().mean() - rho) ** 2
            return loss
        return (score_mask.float().mean() - rho) ** 2

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, target_ratio={self.target_ratio}, ratio_weight={self.ratio_weight}, "
            f"max_violation={self.max_violation}, lambda_sparse={self.lambda_sparse}, lambda_dense={self.lambda_dense}"
        )


def per_caption_loop_similarity(
    head: CrossSparseAggrNet,
    img_embs: torch.Tensor,
    cap_embs: torch.Tensor,
    cap_lens: torch.Tensor,
    long_cap_embs: Optional[torch.Tensor] = None,
    long_cap_lens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference: the same similarity as ``head`` (eval mode) computed the LAPS way, one caption at a time.

    Image self-saliency and the dense-caption relevance are computed once (LAPS computes the saliency
    before its loop); then, for every caption, selection and aggregation run again over all images:
    score predictors, top-k, gather of the kept patches, aggregation MLP on them, both branches, as
    the public LAPS/SEPS code does. Slow (``B_t`` Python iterations, per-image work repeated per
    caption); it exists to check and benchmark the vectorised forward.

    Returns:
        ``(B_v, B_t)`` similarities.
    """
    cap_lens, long_cap_lens = head._check_inputs(img_embs, cap_embs, cap_lens, long_cap_embs, long_cap_lens)
    paper, beta, k = head.use_paper_version, head.beta, head.num_keep
    cls = img_embs[:, :1] if head.has_cls else None
    patches = img_embs[:, 1:] if head.has_cls else img_embs
    num_images, num_patches, width = patches.shape
    sparse_mlp = head.sparse_aggregation if head.use_dual_aggr else head.aggregation
    dense_mlp = head.dense_aggregation if head.use_dual_aggr else head.aggregation

    def unit64(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def select_and_aggregate(score: torch.Tensor, mlp: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
        order = score.argsort(dim=1, descending=True)
        kept_idx, dropped_idx = order[:, :k], order[:, k:]
        kept = patches.gather(1, kept_idx[..., None].expand(-1, -1, width))
        dropped = patches.gather(1, dropped_idx[..., None].expand(-1, -1, width))
        fuse = torch.softmax(score.gather(1, dropped_idx).float(), dim=1)
        extra = (fuse[..., None] * dropped).sum(dim=1, keepdim=True)
        weights = torch.softmax((mlp(kept) * head.aggregation_scale).transpose(1, 2), dim=-1)  # (B_v, N_c, k)
        return torch.bmm(weights, kept), extra

    def similarity(tokens: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        tokens = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        align = torch.matmul(tokens, words.t())  # (B_v, M, n_words)
        if not paper:
            align = torch.where(align > 0, align, SCAN_LEAKY_SLOPE * align)
        word_best, token_best = align.max(dim=1).values, align.max(dim=2).values
        sims = word_best.mean(dim=1) + token_best.mean(dim=1)
        if paper:
            for best in (word_best, token_best):
                top = best.sort(dim=1, descending=True).values[:, : head.top_k]
                top = torch.cat([top, top.new_zeros(num_images, head.top_k - top.shape[1])], dim=1)
                sims = sims + head.relevance_mlp(top)[:, 0]
        return sims

    # As in LAPS, the guidance scores that need no caption are computed once, before the loop.
    unit_patches64 = unit64(patches).double()
    saliency = (unit_patches64 * unit64(patches.double().mean(dim=1))[:, None]).sum(-1)
    dense_relevance = None
    if long_cap_embs is not None:
        dense_dirs = torch.stack(
            [unit64(long_cap_embs[v, : int(long_cap_lens[v])].double().mean(dim=0)) for v in range(num_images)]
        )
        dense_relevance = (unit_patches64 * dense_dirs[:, None]).sum(-1)

    columns = []
    for t in range(cap_embs.shape[0]):
        words = cap_embs[t, : int(cap_lens[t])]
        text_relevance = unit_patches64 @ unit64(words.double().mean(dim=0))
        if paper:
            predicted = torch.sigmoid(head.sparse_score_predictor(patches)[..., 0]).double()
            sparse_score = (1 - 2 * beta) * predicted + beta * (_minmax(text_relevance) + 2 * _minmax(saliency))
            if dense_relevance is not None:
                sparse_score = sparse_score + beta * _minmax(dense_relevance)
        else:
            sparse_score = saliency + text_relevance
        aggregated, extra = select_and_aggregate(sparse_score, sparse_mlp)
        dense = None
        if dense_relevance is not None:
            if paper:
                predicted = torch.sigmoid(head.dense_score_predictor(patches)[..., 0]).double()
                dense_score = (1 - 2 * beta) * predicted + 2 * beta * (_minmax(dense_relevance) + _minmax(saliency))
            else:
                dense_score = saliency + dense_relevance
            dense = select_and_aggregate(dense_score, dense_mlp)
        unit_words = words / words.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        prefix = [cls] if cls is not None else []
        if dense is not None and head.use_dual_aggr:
            tokens = torch.cat(prefix + [aggregated + dense[0], (extra + dense[1]) / 2], dim=1)
            sims = similarity(tokens, unit_words)
        else:
            sims = similarity(torch.cat(prefix + [aggregated, extra], dim=1), unit_words)
            if dense is not None:
                sims = sims + similarity(torch.cat(prefix + list(dense), dim=1), unit_words)
        columns.append(sims)
    return torch.stack(columns, dim=1)
