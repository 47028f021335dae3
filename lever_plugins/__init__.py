"""lever-plugins: research modules for LAVIS-style vision-language models as registered plugins.

Importing this package is cheap: it imports neither torch nor LAVIS. Public classes are resolved
lazily on first attribute access (``from lever_plugins import GatedFusionModule``). To register the
plugins into LAVIS's registry, ``import lever_plugins.registry``.
"""
from __future__ import annotations

import importlib

from lever_plugins._version import __version__

# No `typing` import: this package is imported at every interpreter start by the startup hook
# (lever_plugins/_startup.py); annotations are strings (`from __future__ import annotations`).

# public name -> module that defines it
_LAZY_NAMES = {
    "GatedFusionModule": "lever_plugins.modules.gated_fusion",
    "CrossSparseAggrNet": "lever_plugins.modules.seps",
    "SEPSLoss": "lever_plugins.modules.seps",
    "PointerSelectorV1": "lever_plugins.modules.pointer",
    "PointerSelectorV2": "lever_plugins.modules.pointer",
    "PointerSelectorV3": "lever_plugins.modules.pointer",
    "PointerSelectorV1Settings": "lever_plugins.schemas.pointer",
    "PointerSelectorV2Settings": "lever_plugins.schemas.pointer",
    "PointerSelectorV3Settings": "lever_plugins.schemas.pointer",
    "build_model_v1": "lever_plugins.modules.pointer",
    "build_model_v2": "lever_plugins.modules.pointer",
    "build_model_v3": "lever_plugins.modules.pointer",
}

__all__ = ["__version__", *_LAZY_NAMES]


def __getattr__(name: str) -> object:
    module_name = _LAZY_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'lever_plugins' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
