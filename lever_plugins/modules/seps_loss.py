"""``SEPSLoss`` (pure torch): hinge triplet alignment of a similarity matrix plus the selection-ratio term.

It trains :class:`lever_plugins.modules.seps.CrossSparseAggrNet` (and is re-exported there): the head's
training forward returns ``(sims, score_mask)`` and ``SEPSLoss(sims, score_mask, img_ids)`` gives
``(total, align, ratio)``. ``score_mask`` holds the head's keep decisions, whose mean is the fraction of
patches the head actually kept, so the ratio term steers what is kept.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from lever_plugins.schema import settings_from
from lever_plugins.schemas.seps import SepsLossSettings

__all__ = ["SEPSLoss", "ScoreMask"]

ScoreMask = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


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
        settings: a :class:`SepsLossSettings` (every key documented there), a mapping of its keys (a recipe
            block) or None; or leave it out and give the keys as keyword arguments (``SEPSLoss(margin=0.2,
            ...)``). Kept as ``self.settings``.

    ``max_violation`` is also state: it starts at ``settings.max_violation`` and the task switches it
    with :meth:`set_max_violation` (the settings keep what was configured).
    """

    def __init__(self, settings: Union[SepsLossSettings, Mapping[str, Any], None] = None, /, **kwargs: Any) -> None:
        super().__init__()
        self.settings: SepsLossSettings = settings_from(SepsLossSettings, settings, "seps_loss", **kwargs)
        self.max_violation = self.settings.max_violation

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
        return align + self.settings.ratio_weight * ratio, align, ratio

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
        margin = self.settings.margin
        image_to_text = (margin + sims[anchor_rows] - anchor[:, None]).clamp(min=0)  # (B_t anchors, B_t)
        image_to_text = image_to_text.masked_fill(positive[anchor_rows], 0)
        text_to_image = (margin + sims - anchor[None, :]).clamp(min=0)  # (B_v, B_t anchors)
        text_to_image = text_to_image.masked_fill(positive, 0)
        if self.max_violation:
            image_to_text = image_to_text.amax(dim=1)
            text_to_image = text_to_image.amax(dim=0)
        return image_to_text.sum() + text_to_image.sum()

    def ratio_loss(self, score_mask: Optional[ScoreMask], like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Squared gap between the mean keep decision and ``target_ratio`` (class docstring)."""
        s = self.settings
        rho = s.target_ratio
        if score_mask is None:
            return torch.zeros((), device=None if like is None else like.device)
        if isinstance(score_mask, (tuple, list)):
            if not 1 <= len(score_mask) <= 2:
                raise ValueError(f"SEPSLoss: a tuple score_mask must be (D_s,) or (D_s, D_d), got {len(score_mask)} items")
            loss = s.lambda_sparse * (score_mask[0].float().mean() - rho) ** 2
            if len(score_mask) == 2:
                loss = loss + s.lambda_dense * (score_mask[1].float().mean() - rho) ** 2
            return loss
        return (score_mask.float().mean() - rho) ** 2

    def extra_repr(self) -> str:
        return f"{self.settings!r}; max_violation in use: {self.max_violation}"
