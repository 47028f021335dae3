"""``import lever_plugins.registry``: register every plugin into LAVIS's registry.

Works with whichever ``lavis`` is importable (the PyPI package or a project's vendored copy).
Idempotent: importing again, ``importlib.reload`` or a re-run notebook cell is harmless. A name that is
already registered to a *different* class is an error naming both; LAVIS's own names are never
overwritten (all of ours start with ``lever_``).

Also provides :func:`get_class`, a lookup that turns LAVIS's silent ``None`` for an unknown name into
an error listing the known names with a did-you-mean.

Plugin packages (entry-point group ``lever_plugins.plugins``, see :mod:`lever_plugins.catalog`) are
registered too. One that cannot be loaded, whose class does not import, or whose name is taken is
skipped with a :class:`PluginLoadWarning` naming its distribution and entry point (also kept in
:data:`PLUGIN_ERRORS`); ours and the other packages' plugins are registered regardless.
"""
from __future__ import annotations

import warnings

from lever_plugins import catalog
from lever_plugins.compat import lavis_registry
from lever_plugins.schema import suggest

registry = lavis_registry()
# LAVIS registers its LR schedulers only when lavis.common.optims is imported.
import lavis.common.optims  # noqa: E402,F401

_MAPPING_OF_KIND = {
    "model": "model_name_mapping",
    "task": "task_name_mapping",
    "dataset": "builder_name_mapping",
    "runner": "runner_name_mapping",
    "lr_scheduler": "lr_scheduler_name_mapping",
    "processor": "processor_name_mapping",
}


class RegistryConflict(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class PluginLoadWarning(UserWarning):
    """A plugin package's entry point or row could not be registered (the message says which and why)."""


PLUGIN_ERRORS: list[str] = []


def register_plugin(spec: catalog.PluginSpec) -> type:
    """Register one plugin class under its name (no-op if it is already registered to it)."""
    if not spec.origin and not spec.name.startswith("lever_"):
        raise ValueError(f"plugin names must start with 'lever_' (got {spec.name!r})")
    mapping = registry.mapping[_MAPPING_OF_KIND[spec.kind]]
    cls = spec.load()
    existing = mapping.get(spec.name)
    if existing is not None and existing is not cls and _qualified(existing) != _qualified(cls):
        raise RegistryConflict(
            f"LAVIS {spec.kind} name {spec.name!r} is already registered to {_qualified(existing)}; "
            f"lever_plugins wants it for {_qualified(cls)}"
        )
    mapping[spec.name] = cls  # same class (or its reloaded self): refresh
    return cls


def register_all() -> dict[str, type]:
    registered = {spec.name: register_plugin(spec) for spec in catalog.PLUGINS}
    errors = catalog.plugin_load_errors()
    for spec in catalog.external_plugins():
        try:
            cls = register_plugin(spec)
        except Exception as exc:  # their class does not import, or the name is LAVIS's / another's
            errors.append(f"plugin package {spec.origin}: {spec.kind} {spec.name!r} not registered "
                          f"({type(exc).__name__}: {exc})")
            continue
        registered[spec.name] = cls
    PLUGIN_ERRORS[:] = errors
    for line in errors:
        warnings.warn(line, PluginLoadWarning, stacklevel=2)
    return registered


def get_class(kind: str, name: str) -> type:
    """The registered class of ``kind`` (model, task, dataset, runner, lr_scheduler) called ``name``."""
    mapping = registry.mapping[_MAPPING_OF_KIND[kind]]
    cls = mapping.get(name)
    if cls is None:
        known = sorted(mapping)
        raise KeyError(f"no LAVIS {kind} named {name!r}{suggest(name, known)}; known: {', '.join(known)}")
    return cls


REGISTERED = register_all()
