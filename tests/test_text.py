"""BLIP's eval caption processor, as SPRC applies it to every CIRR / FashionIQ caption."""
from __future__ import annotations

import pytest

from lever_plugins.datasets.text import blip_caption

CASES = [
    ("Change it to a SQUARE.", "change it to a square"),
    ("  is red (not blue); has \"stripes\"!  ", "is red not blue has stripes"),
    ("Has a longer sleeve and is darker", "has a longer sleeve and is darker"),
    ("a.b:c~d#e*f", "a b c d e f"),
    ("keeps, commas? and-dashes'", "keeps, commas? and-dashes'"),
]


@pytest.mark.parametrize("text, expected", CASES)
def test_blip_caption_on_hand_built_cases(text, expected):
    assert blip_caption(text) == expected


def test_blip_caption_keeps_at_most_max_words():
    assert blip_caption(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))
    assert blip_caption("one two three", max_words=2) == "one two"


@pytest.mark.lavis
@pytest.mark.parametrize("text", [case[0] for case in CASES] + ["x " * 70])
def test_blip_caption_equals_lavis_blip_caption_processor(text):
    from lever_plugins.compat import import_lavis

    import_lavis()
    from lavis.processors.blip_processors import BlipCaptionProcessor

    assert blip_caption(text) == BlipCaptionProcessor()(text)
