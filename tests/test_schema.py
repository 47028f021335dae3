"""The settings engine behind every recipe block."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from lever_plugins.schema import Settings, describe, from_mapping, setting


@dataclass(kw_only=True)
class Inner(Settings):
    heads: int = setting(8, help="heads", ge=1)
    scale: float = setting(0.0, help="scale")


@dataclass(kw_only=True)
class Outer(Settings):
    name: str = setting(help="required name")
    mode: Literal["a", "b"] = setting("a", help="mode")
    inner: Inner = setting(default_factory=Inner, help="nested block")
    maybe: Optional[Inner] = setting(None, help="optional nested block")
    sizes: list[int] = setting(default_factory=list, help="sizes")


def _problems(data):
    problems: list[str] = []
    result = from_mapping(Outer, data, "model", problems)
    return result, problems


def test_valid_block_fills_defaults():
    result, problems = _problems({"name": "x", "inner": {"heads": 2}})
    assert problems == [] and result.inner.heads == 2 and result.inner.scale == 0.0 and result.maybe is None


def test_every_problem_is_reported_with_its_path():
    _, problems = _problems({"mode": "c", "inner": {"heads": 0, "scal": 1}, "sizes": [1, "two"], "extra": 1})
    assert problems == [
        "model.extra: unknown key",
        "model.name: required key is missing (required name)",
        "model.mode: expected one of 'a', 'b', got 'c'",
        "model.inner.scal: unknown key (did you mean 'scale'?)",
        "model.inner.heads: must be >= 1, got 0",
        "model.sizes[1]: expected an integer, got str 'two'",
    ]


def test_optional_nested_block_reports_its_own_problems():
    _, problems = _problems({"name": "x", "maybe": {"heads": -1, "typo": 0}})
    assert problems == ["model.maybe.typo: unknown key", "model.maybe.heads: must be >= 1, got -1"]
    result, problems = _problems({"name": "x", "maybe": {"heads": 3}})
    assert problems == [] and result.maybe.heads == 3


def test_bool_is_not_an_integer_and_int_is_a_float():
    _, problems = _problems({"name": "x", "inner": {"heads": True, "scale": 2}})
    assert problems == ["model.inner.heads: expected an integer, got bool True"]


def test_python_construction_rejects_bad_values():
    with pytest.raises(ValueError, match="heads: must be >= 1, got 0"):
        Inner(heads=0)


def test_describe_lists_nested_keys():
    keys = [row[0] for row in describe(Outer)]
    assert keys[:5] == ["name", "mode", "inner", "inner.heads", "inner.scale"]


@dataclass(kw_only=True)
class _Inner(Settings):
    width: int = setting(4, help="w", ge=1)


@dataclass(kw_only=True)
class _Outer(Settings):
    mode: Literal["fast", "exact"] = setting("fast", help="m")
    scale: float = setting(1.0, help="s", gt=0)
    inner: _Inner = setting(default_factory=_Inner, help="i")


def test_settings_built_in_python_get_the_recipe_type_and_choice_checks():
    with pytest.raises(ValueError, match=r"_Outer: mode: expected one of 'fast', 'exact', got 'fsat'"):
        _Outer(mode="fsat")
    with pytest.raises(ValueError, match=r"_Outer: scale: expected a number, got str 'wide'"):
        _Outer(scale="wide")
    with pytest.raises(ValueError, match=r"_Inner: width: must be >= 1, got 0"):
        _Outer(inner=_Inner(width=0))
    assert _Outer(scale=2, inner=_Inner(width=3)).inner.width == 3  # an int is a number


def test_settings_from_takes_an_instance_a_mapping_keywords_or_none_but_not_two():
    from lever_plugins.schema import settings_from

    built = _Outer(mode="exact")
    assert settings_from(_Outer, built, "block") is built
    assert settings_from(_Outer, {"mode": "exact"}, "block") == built == settings_from(_Outer, None, "block", mode="exact")
    assert settings_from(_Outer, None, "block") == _Outer()
    with pytest.raises(TypeError, match="block: give settings or keyword settings, not both"):
        settings_from(_Outer, built, "block", mode="fast")
    with pytest.raises(ValueError, match=r"block.inner.width: must be >= 1"):
        settings_from(_Outer, None, "block", inner={"width": 0})
