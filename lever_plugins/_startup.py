"""Interpreter-start hook: makes LAVIS 1.0.2 importable on modern transformers, whatever the import order.

``setup.py`` installs ``lever_plugins_startup.pth`` into site-packages; Python runs it at start-up and it
calls :func:`install`. That only puts :class:`ShimFinder` at the front of ``sys.meta_path``: nothing is
imported (no torch, no transformers; this module imports ``sys`` and ``os`` only). Later, when
``transformers.modeling_utils`` is imported (by LAVIS, by transformers itself, by anyone), the finder wraps
its loader so that right after the module has run, the three helpers LAVIS's Q-Former imports from there
(``apply_chunking_to_forward``, ``find_pruneable_heads_and_indices``, ``prune_linear_layer``; in
``transformers.pytorch_utils`` since transformers 4.56) are re-exposed on it. So an unmodified LAVIS
``train.py`` imports ``lavis.tasks`` first and still works, and ``import lever_plugins.registry`` may go
anywhere among its imports.

Only names that are missing are added, and only from ``transformers.pytorch_utils`` (where transformers
defines them itself): on transformers <= 4.55 (and LAVIS's own pin, 4.26) nothing changes. Set
``LEVER_PLUGINS_NO_STARTUP_HOOK=1`` to switch the hook off; then ``import lever_plugins.registry`` must come
before the first LAVIS import again (``lever_plugins.compat`` applies the same shim eagerly).
"""
from __future__ import annotations

import os
import sys

TARGET = "transformers.modeling_utils"
MOVED_HELPERS = ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer")
DISABLE_ENV = "LEVER_PLUGINS_NO_STARTUP_HOOK"
ADDED: list = []  # the helper names re-exposed in this process (by the hook or lever_plugins.compat)


def add_moved_helpers(modeling_utils) -> list:
    """Re-expose the moved helpers on ``modeling_utils`` (a module); returns the names added."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    if pytorch_utils is None:
        try:
            import transformers.pytorch_utils as pytorch_utils  # loaded by modeling_utils itself
        except ImportError:  # transformers < 4.20 keeps them in modeling_utils
            return []
    added = []
    for name in MOVED_HELPERS:
        if not hasattr(modeling_utils, name) and hasattr(pytorch_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
            added.append(name)
    ADDED.extend(added)
    return added


class _PatchingLoader:
    """Runs the real loader, then adds the helpers; everything else is the real loader's."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            add_moved_helpers(module)
        except Exception:  # never break an import; LAVIS then reports the missing name itself
            pass
        # leave the module as the real loader made it (isinstance checks on __loader__ keep working)
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader

    def __getattr__(self, name):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class ShimFinder:
    """``sys.meta_path`` entry that only ever handles ``transformers.modeling_utils``."""

    lever_plugins_shim = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "lever_plugins_shim", False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader)
        return spec

    def invalidate_caches(self):
        pass


def installed() -> bool:
    return any(getattr(finder, "lever_plugins_shim", False) for finder in sys.meta_path)


def install() -> bool:
    """Put the finder first on ``sys.meta_path`` (idempotent); patch now if transformers is already loaded."""
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return False
    if not installed():
        sys.meta_path.insert(0, ShimFinder())
    loaded = sys.modules.get(TARGET)
    if loaded is not None:
        add_moved_helpers(loaded)
    return True
