"""The toy plugin's pure-torch module, in the project's module convention (no LAVIS import).

``ToyAdapter(settings, width)`` keeps ``self.settings``; ``lever_plugins.schema.settings_from`` turns a
mapping, keyword arguments or ``None`` into settings, so ``ToyAdapter(width=16, expansion=4)`` works too.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lever_plugins.schema import settings_from
from toy_lever_plugin.settings import ToyAdapterSettings


class ToyAdapter(nn.Module):
    """``x + scale * MLP(x)`` on (B, width) features; the identity at init when ``scale_init`` is 0."""

    def __init__(self, settings: Optional[ToyAdapterSettings | dict] = None, *, width: int, **kwargs: Any) -> None:
        super().__init__()
        self.settings = settings_from(ToyAdapterSettings, {**dict(settings or {}), **kwargs}
                                      if not isinstance(settings, ToyAdapterSettings) else settings, "adapter")
        hidden = width * self.settings.expansion
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.scale = nn.Parameter(torch.tensor(float(self.settings.scale_init)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, width) -> (B, width)."""
        return features + self.scale * self.mlp(features)
