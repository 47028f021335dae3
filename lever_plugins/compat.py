"""Compatibility with the LAVIS 1.0.2 + modern-transformers stack, without editing LAVIS.

LAVIS 1.0.2 was written against transformers 4.26. Two things differ on the modern stack we install by
default (SPEC §8):

* LAVIS's Q-Former imports ``apply_chunking_to_forward``, ``find_pruneable_heads_and_indices`` and
  ``prune_linear_layer`` from ``transformers.modeling_utils``; they moved to
  ``transformers.pytorch_utils``. We re-expose them at the old location before LAVIS is imported.
* ``import lavis`` is slow (5-7 s) and pulls in cv2, spacy, decord...; nothing outside the LAVIS
  integration may import it, so every LAVIS import goes through :func:`import_lavis`.
"""
from __future__ import annotations

import importlib
import sys
import warnings
from types import ModuleType

from lever_plugins._startup import MOVED_HELPERS as _MOVED_HELPERS, add_moved_helpers  # noqa: F401


class LavisUnavailable(ImportError):
    """LAVIS cannot be imported; the message says why and how to fix it."""


def install_transformers_shim() -> list[str]:
    """Re-expose helpers LAVIS expects in ``transformers.modeling_utils``; returns the names added.

    The startup hook (``lever_plugins/_startup.py``, installed as a ``.pth``) does the same lazily,
    whatever the import order; this eager version covers ``LEVER_PLUGINS_NO_STARTUP_HOOK=1`` and
    installs without the hook.
    """
    import transformers.modeling_utils as modeling_utils

    return add_moved_helpers(modeling_utils)


def import_lavis() -> ModuleType:
    """Import ``lavis`` (PyPI or a project's vendored copy) after applying the shim."""
    if "lavis" in sys.modules:
        return sys.modules["lavis"]
    try:
        install_transformers_shim()
        with warnings.catch_warnings():
            # LAVIS imports timm's pre-1.0 module paths; timm 1.x warns on each, which is noise for users.
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\..*")
            return importlib.import_module("lavis")
    except ImportError as exc:
        raise LavisUnavailable(
            f"salesforce-lavis is not importable ({type(exc).__name__}: {exc}). "
            "Install it with `pip install --no-deps salesforce-lavis==1.0.2` and run `lever-plugins doctor`."
        ) from exc


def lavis_registry():
    """LAVIS's global registry object (imports LAVIS)."""
    import_lavis()
    from lavis.common.registry import registry

    return registry
