"""Text-conditioned gated update of image tokens, for composed image retrieval (pure torch).

In a BLIP-2 CIR model the reference-image tokens are updated with the modification text before the
Q-Former reads them::

    text_embeds = Qformer.bert.embeddings(input_ids)                        # (B, L, 768)
    image_embeds = gated_fusion(image_embeds, text_embeds, text_attention)  # (B, 257, 1408)

Each image token attends to the text tokens (multi-head cross-attention, padding masked), a
per-channel sigmoid gate computed from that update decides how much of each channel passes, and a
learnable scalar ``alpha`` scales the whole update::

    update = CrossAttention(q = image, k = v = text)        (B, N, H)
    gate   = sigmoid(W_g @ update)                          (B, N, H), W_g bias-free
    out    = image + alpha * gate * update

``alpha`` starts at 0, so the module is exactly the identity at initialisation: switching it on in a
pretrained model changes nothing until training moves ``alpha`` (the first step trains ``alpha`` only,
because every other parameter's gradient is multiplied by it). The same computation runs in training
and retrieval; only attention dropout depends on ``self.training``.

Parameters (``H`` = vision width ``hidden_size``, ``T`` = ``text_width``): query and output
projections ``2 (H^2 + H)``, key/value projections from the text width ``2 (T H + H)``, gate ``H^2``,
``alpha`` 1, i.e. ``3H^2 + 2TH + 4H + 1``. At ``H = T = 768`` that is 2,952,193, the count the seed
reports (a 768-d ``nn.MultiheadAttention`` 2,362,368 + bias-free gate 589,824 + alpha); at the real
BLIP-2 ViT-g setting ``H = 1408, T = 768`` it is 8,115,713.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lever_plugins.schema import settings_from
from lever_plugins.schemas.gated_fusion import GatedFusionSettings

__all__ = ["GatedFusionModule"]


class GatedFusionModule(nn.Module):
    """Gated, text-conditioned residual update of image tokens; identity at initialisation.

    Args:
        hidden_size: width ``H`` of the image tokens (vision width: 1408 for ViT-g, 1024 for ViT-L).
        text_width: width ``T`` of the text tokens (Q-Former hidden, 768); defaults to ``hidden_size``.
        settings: a :class:`GatedFusionSettings` (``num_heads``, ``dropout``, ``alpha_init``: documented
            there), a mapping of its keys (the recipe's ``gated_fusion:`` block) or None; or leave it out
            and give the keys as keyword arguments (``GatedFusionModule(1408, 768, num_heads=8)``). Kept
            as ``self.settings``; the widths come from the backbone and are not settings.

    Raises:
        ValueError: unknown keys or bad values (every problem, each naming its key), or widths that do
            not fit the settings (``num_heads`` must divide ``hidden_size``).
    """

    def __init__(
        self,
        hidden_size: int,
        text_width: Optional[int] = None,
        settings: Union[GatedFusionSettings, Mapping[str, Any], None] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.settings: GatedFusionSettings = settings_from(GatedFusionSettings, settings, "gated_fusion", **kwargs)
        text_width = hidden_size if text_width is None else text_width
        problems = list(self.settings.width_problems(hidden_size, text_width))
        if problems:
            raise ValueError("GatedFusionModule: " + "; ".join(problems))
        self.hidden_size = hidden_size
        self.text_width = text_width
        self.head_dim = hidden_size // self.settings.num_heads

        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(text_width, hidden_size)
        self.v_proj = nn.Linear(text_width, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.gate_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.alpha = nn.Parameter(torch.tensor(float(self.settings.alpha_init)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as ``nn.MultiheadAttention`` does, and ``alpha`` to ``alpha_init``.

        Attention biases start at zero so that an all-zero text yields an exactly zero update.
        """
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)
        self.out_proj.reset_parameters()
        nn.init.zeros_(self.out_proj.bias)
        self.gate_proj.reset_parameters()
        with torch.no_grad():
            self.alpha.fill_(self.settings.alpha_init)

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_attention_mask: Optional[torch.Tensor] = None,
        return_gate: bool = False,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Update image tokens with the text.

        Args:
            image_embeds: ``(B, N, hidden_size)`` image tokens (CLS first for a ViT).
            text_embeds: ``(B, L, text_width)`` text token embeddings.
            text_attention_mask: ``(B, L)``, nonzero/True = token, 0/False = padding; ``None`` = no padding.
                Padding tokens have no influence. A row whose text is all padding gets a zero update
                (its image tokens pass through unchanged) and a zero gate.
            return_gate: also return the per-token gate.

        Returns:
            ``(B, N, hidden_size)`` updated image tokens, in ``image_embeds``' dtype; with
            ``return_gate``, a tuple ``(out, gate)`` where ``gate`` is ``(B, N)``, the channel mean of
            the sigmoid gate per image token (in ``[0, 1]``; multiply by ``alpha`` for the effective scale).
        """
        self._check_inputs(image_embeds, text_embeds, text_attention_mask)
        batch, num_image, _ = image_embeds.shape
        num_text = text_embeds.shape[1]

        has_text: Optional[torch.Tensor] = None
        attn_mask: Optional[torch.Tensor] = None
        if text_attention_mask is not None:
            keep = text_attention_mask.to(device=text_embeds.device) != 0
            has_text = keep.any(dim=1)
            # A row with no token at all would softmax over nothing (NaN, also in the backward pass);
            # let it attend to its padding instead and zero its update below.
            keep = keep | ~has_text[:, None]
            attn_mask = keep[:, None, None, :]  # (B, 1, 1, L), True = may be attended

        heads, dropout = self.settings.num_heads, self.settings.dropout
        query = self.q_proj(image_embeds).view(batch, num_image, heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(text_embeds).view(batch, num_text, heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(text_embeds).view(batch, num_text, heads, self.head_dim).transpose(1, 2)
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout if self.training else 0.0
        )
        update = self.out_proj(context.transpose(1, 2).reshape(batch, num_image, self.hidden_size))
        if has_text is not None:
            update = update * has_text[:, None, None].to(update.dtype)

        gate = torch.sigmoid(self.gate_proj(update))
        out = image_embeds + (self.alpha * (gate * update)).to(image_embeds.dtype)
        if not return_gate:
            return out
        token_gate = gate.mean(dim=-1)
        if has_text is not None:
            token_gate = token_gate * has_text[:, None].to(token_gate.dtype)
        return out, token_gate

    def _check_inputs(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_attention_mask: Optional[torch.Tensor]
    ) -> None:
        if image_embeds.dim() != 3 or image_embeds.shape[-1] != self.hidden_size:
            raise ValueError(
                f"GatedFusionModule: image_embeds must be (B, N, hidden_size={self.hidden_size}), "
                f"got shape {tuple(image_embeds.shape)}"
            )
        if text_embeds.dim() != 3 or text_embeds.shape[-1] != self.text_width:
            raise ValueError(
                f"GatedFusionModule: text_embeds must be (B, L, text_width={self.text_width}), "
                f"got shape {tuple(text_embeds.shape)}"
            )
        if text_embeds.shape[0] != image_embeds.shape[0]:
            raise ValueError(
                f"GatedFusionModule: batch sizes differ: image_embeds {image_embeds.shape[0]}, "
                f"text_embeds {text_embeds.shape[0]}"
            )
        if text_embeds.shape[1] == 0:
            raise ValueError("GatedFusionModule: text_embeds has no tokens (L = 0)")
        if text_attention_mask is not None and tuple(text_attention_mask.shape) != tuple(text_embeds.shape[:2]):
            raise ValueError(
                f"GatedFusionModule: text_attention_mask must be (B, L) = {tuple(text_embeds.shape[:2])}, "
                f"got shape {tuple(text_attention_mask.shape)}"
            )

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, text_width={self.text_width}, {self.settings!r}"
