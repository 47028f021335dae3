"""Recipe schema of the ``model.gated_fusion:`` block (settings of :class:`GatedFusionModule`).

Pure Python (no torch): ``lever-plugins validate`` and ``--dry-run`` read it without building anything.
The widths are not settings: they come from the backbone (vision width of the image encoder, hidden
size of the Q-Former), so the checks that involve them (:meth:`GatedFusionSettings.width_problems`:
``num_heads`` must divide the vision width) run when the module is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from lever_plugins.schema import Settings, setting

__all__ = ["GatedFusionSettings", "gated_fusion_parameter_count"]


@dataclass
class GatedFusionSettings(Settings):
    """Settings of the text-conditioned gated update of the reference-image tokens.

    ``alpha_init = 0`` makes the module exactly the identity at step 0, so switching
    ``use_gated_fusion`` on reproduces the pretrained baseline until training moves ``alpha``.
    Any nonzero value perturbs the pretrained model from the first step.
    """

    num_heads: int = setting(
        8, ge=1, help="attention heads of the image-to-text cross-attention; must divide the vision width"
    )
    dropout: float = setting(
        0.0, ge=0.0, lt=1.0, help="dropout on the cross-attention weights (training only)"
    )
    alpha_init: float = setting(
        0.0, help="initial residual scale alpha; 0 = exact identity at init, nonzero breaks it"
    )

    def extra_problems(self) -> Iterator[str]:
        if isinstance(self.alpha_init, (int, float)) and not math.isfinite(self.alpha_init):
            yield f"alpha_init: must be finite, got {self.alpha_init!r}"

    def width_problems(self, hidden_size: object, text_width: object) -> Iterator[str]:
        """Problems of these settings with the backbone's widths (image tokens ``hidden_size``, text ``text_width``)."""
        for name, value in (("hidden_size", hidden_size), ("text_width", text_width)):
            if not _positive_int(value):
                yield f"{name} must be a positive integer, got {value!r}"
        heads = self.num_heads
        if _positive_int(hidden_size) and _positive_int(heads) and hidden_size % heads:
            yield (
                f"num_heads={heads} must divide hidden_size={hidden_size} (the vision width); "
                f"try one of {_divisors_near(hidden_size, heads)}"
            )


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _divisors_near(n: int, target: int) -> list[int]:
    """Up to three divisors of ``n`` closest to ``target``, for the error message."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(sorted(divisors, key=lambda d: (abs(d - target), d))[:3])


def gated_fusion_parameter_count(hidden_size: int, text_width: int | None = None) -> int:
    """Trainable parameters of ``GatedFusionModule(hidden_size, text_width)`` without building it.

    With ``H = hidden_size`` and ``T = text_width``: query and output projections ``2 (H*H + H)``,
    key and value projections from text width ``2 (T*H + H)``, bias-free gate ``H*H``, scalar alpha
    ``1`` -> ``3H^2 + 2TH + 4H + 1`` (2,952,193 at H = T = 768; 8,115,713 at H = 1408, T = 768).
    """
    h = int(hidden_size)
    t = h if text_width is None else int(text_width)
    return 3 * h * h + 2 * t * h + 4 * h + 1
