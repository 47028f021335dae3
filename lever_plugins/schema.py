"""Typed settings: dataclasses that are both the Python config objects and the recipe schema.

A settings class is a ``@dataclass`` deriving from :class:`Settings` whose fields are declared with
:func:`setting`. The same declaration serves three purposes:

* building from Python (``GatedFusionSettings(num_heads=0)`` raises ``ValueError`` naming the value);
* validating a recipe block (:func:`from_mapping` reports *every* problem with its full key path,
  wrong types, out-of-range values and unknown keys with a did-you-mean);
* documenting the recipe (:func:`describe` lists each key, its type, default and help).

Pure Python: no torch, no LAVIS, so ``lever-plugins validate`` stays fast.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import types
import typing
from typing import Any, Iterable, Iterator, Literal, Mapping, Optional, Sequence, Union

_MISSING = dataclasses.MISSING
_FLOAT_LITERAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class RecipeError(Exception):
    """One or more problems in a recipe; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str], source: Optional[str] = None):
        self.problems = list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in self.problems))


def setting(
    default: Any = _MISSING,
    *,
    help: str,
    default_factory: Any = _MISSING,
    ge: Optional[float] = None,
    gt: Optional[float] = None,
    le: Optional[float] = None,
    lt: Optional[float] = None,
    path: Optional[str] = None,
) -> Any:
    """Declare a settings field.

    Args:
        default: default value (omit for a required key).
        help: one line shown by ``lever-plugins list`` and in the README recipe reference.
        default_factory: for mutable defaults.
        ge, gt, le, lt: numeric bounds, checked on construction and in recipes.
        path: ``"file"`` or ``"dir"`` when the value is a local path that must exist when used
            (``package:relative/path`` names a file shipped inside lever_plugins); ``"checkpoint"``:
            a checkpoint file or a transformers model folder (one with a ``config.json``).
    """
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "path": path}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def suggest(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known name, or an empty string."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = " | ".join(_type_name(a) for a in args)
        return f"{inner} | null" if len(args) < len(typing.get_args(tp)) else inner
    if origin in (list, Sequence, tuple):
        args = typing.get_args(tp)
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin in (dict, Mapping):
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check ``value`` against type ``tp``; return the converted value (appends to problems)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            problems.append(f"{path}: expected {_type_name(tp)}, got null")
            return None
        non_null = [arg for arg in args if arg is not type(None)]
        if len(non_null) == 1:  # Optional[X]: report X's own problems (e.g. inside a nested block)
            return _convert(value, non_null[0], path, problems)
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            converted = _convert(value, arg, path, trial)
            if not trial:
                return converted
        problems.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            problems.append(
                f"{path}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}"
                + suggest(value, [str(c) for c in choices])
            )
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # built, so already checked
            return value
        return from_mapping(tp, value, path, problems)
    if origin in (list, Sequence, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
            return None
        args = typing.get_args(tp)
        if not args:
            return list(value)
        return [_convert(v, args[0], f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
            return None
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_LITERAL.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string; it is plainly a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {type(value).__name__} {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def _bound_problems(name: str, value: Any, meta: Mapping[str, Any]) -> Iterator[str]:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if meta.get("ge") is not None and not value >= meta["ge"]:
        yield f"{name}: must be >= {meta['ge']}, got {value!r}"
    if meta.get("gt") is not None and not value > meta["gt"]:
        yield f"{name}: must be > {meta['gt']}, got {value!r}"
    if meta.get("le") is not None and not value <= meta["le"]:
        yield f"{name}: must be <= {meta['le']}, got {value!r}"
    if meta.get("lt") is not None and not value < meta["lt"]:
        yield f"{name}: must be < {meta['lt']}, got {value!r}"


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


class Settings:
    """Base for settings dataclasses: types, choices and bounds are enforced at construction, as for a recipe.

    Subclasses may override :meth:`extra_problems` for checks that involve several fields; each
    problem is ``"key: message"``.
    """

    def __post_init__(self) -> None:
        problems = list(self.problems())
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))

    def problems(self) -> Iterator[str]:
        # settings built in Python get a recipe's type and choice checks too: a misspelt choice would
        # otherwise pick another branch without a word
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            type_problems: list[str] = []
            _convert(value, hints[f.name], f.name, type_problems)
            yield from type_problems
            if not type_problems:
                yield from _bound_problems(f.name, value, f.metadata)
        yield from self.extra_problems()

    def extra_problems(self) -> Iterator[str]:
        return iter(())

    def differs_from_default(self, name: str) -> bool:
        """Whether key ``name`` holds something other than its default, i.e. was set by the recipe (or caller).

        Presence in a block cannot tell: a resolved recipe spells every default out and is validated again
        when it runs, so a key equal to its default counts as left alone.
        """
        f = next(f for f in dataclasses.fields(self) if f.name == name)  # type: ignore[arg-type]
        if f.default is not _MISSING:
            return getattr(self, name) != f.default
        if f.default_factory is not _MISSING:  # type: ignore[misc]
            return getattr(self, name) != f.default_factory()  # type: ignore[misc]
        return True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def from_mapping(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    """Build settings ``cls`` from a recipe mapping, appending every problem found to ``problems``.

    Returns the instance, or ``None`` if there were problems in this block.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.append(f"{path}: expected a mapping, got {type(data).__name__} {data!r}")
        return None
    start = len(problems)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            problems.append(f"{path}.{key}: unknown key{suggest(key, fields)}")
    kwargs = {}
    for name, f in fields.items():
        key_path = f"{path}.{name}"
        if name in data:
            before = len(problems)
            value = _convert(data[name], hints[name], key_path, problems)
            if len(problems) == before:
                problems.extend(f"{path}.{p}" for p in _bound_problems(name, value, f.metadata))
        elif f.default is not _MISSING or f.default_factory is not _MISSING:  # type: ignore[misc]
            continue
        else:
            problems.append(f"{key_path}: required key is missing ({f.metadata.get('help', '')})")
            continue
        kwargs[name] = value
    if len(problems) > start:
        return None
    # Cross-field checks, without raising (bounds were checked per key above).
    obj = cls.__new__(cls)
    for name, f in fields.items():
        if name in kwargs:
            object.__setattr__(obj, name, kwargs[name])
        elif f.default is not _MISSING:
            object.__setattr__(obj, name, f.default)
        else:
            object.__setattr__(obj, name, f.default_factory())  # type: ignore[misc]
    if isinstance(obj, Settings):
        for problem in obj.extra_problems():
            problems.append(f"{path}.{problem}")
    if len(problems) > start:
        return None
    return obj


PACKAGE_PREFIX = "package:"


def expand_path(value: str) -> str:
    """Expand ``~`` and the ``package:`` prefix (a file shipped inside lever_plugins)."""
    value = str(value)
    if value.startswith(PACKAGE_PREFIX):
        package_root = os.path.dirname(os.path.abspath(__file__))
        return os.path.join(package_root, value[len(PACKAGE_PREFIX):])
    return os.path.expanduser(value)


def settings_from(cls: type, value: Any, name: str, **keys: Any) -> Any:
    """``cls`` settings from an instance, a mapping of its keys (a recipe block), keyword ``keys`` or
    ``None`` (defaults): the one converter every pure-torch module's ``__init__`` calls.

    Raises ``ValueError`` listing every problem of a mapping, each with its key path under ``name``, and
    ``TypeError`` if both ``value`` and ``keys`` are given.
    """
    if keys:
        if value is not None:
            raise TypeError(f"{name}: give settings or keyword settings, not both")
        value = keys
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} settings must be a {cls.__name__} or a mapping, got {type(value).__name__}")
    problems: list[str] = []
    built = from_mapping(cls, dict(value), name, problems)
    if problems:
        raise ValueError(f"invalid {name} settings:\n" + "\n".join(problems))
    return built


def path_problems(obj: Any, path: str) -> list[str]:
    """Problems for every ``path=`` setting in ``obj`` (recursively) that names a missing file/dir."""
    out: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key_path = f"{path}.{f.name}"
        if dataclasses.is_dataclass(value):
            out.extend(path_problems(value, key_path))
            continue
        kind = f.metadata.get("path")
        if not kind or not value:
            continue
        expanded = expand_path(value)
        if kind == "file" and not os.path.isfile(expanded):
            out.append(f"{key_path}: file not found: {value}")
        elif kind == "dir" and not os.path.isdir(expanded):
            out.append(f"{key_path}: directory not found: {value}")
        elif kind == "checkpoint" and not os.path.exists(expanded):
            out.append(f"{key_path}: file not found: {value}")
        elif kind == "checkpoint" and os.path.isdir(expanded) and not os.path.isfile(os.path.join(expanded, "config.json")):
            out.append(f"{key_path}: {value} is a folder without config.json (expected a checkpoint file or a "
                       "transformers BLIP-2 folder)")
    return out


def absolutise_paths(obj: Any) -> None:
    """Make every relative ``path=`` setting of ``obj`` (recursively) absolute against the working dir."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            absolutise_paths(value)
        elif f.metadata.get("path") and isinstance(value, str) and value and not value.startswith(PACKAGE_PREFIX):
            object.__setattr__(obj, f.name, os.path.abspath(os.path.expanduser(value)))


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows ``(key, type, default, help)`` for ``cls`` and its nested settings."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.append((key, "mapping", "", f.metadata.get("help", "")))
            rows.extend(describe(tp, prefix=f"{key}."))
            continue
        if f.default is not _MISSING:
            default = repr(f.default)
        elif f.default_factory is not _MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), default, f.metadata.get("help", "")))
    return rows
