"""Caption text processing shared by every dataset (pure Python, no LAVIS import).

SPRC passes every CIRR / FashionIQ caption through BLIP's caption processor, ``txt_processors["eval"]``
of LAVIS's ``blip2_pretrain`` preset (``blip_caption``: no prompt, ``max_words`` 50), in training and in
evaluation. :func:`blip_caption` computes the same string (checked against LAVIS's
``BlipCaptionProcessor`` in ``tests/test_text.py``), so our datasets need not import LAVIS for it.
"""
from __future__ import annotations

import re

BLIP_CAPTION_MAX_WORDS = 50  # LAVIS BlipCaptionProcessor's default, used by SPRC

_BLIP_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")
_RUNS_OF_SPACE = re.compile(r"\s{2,}")


def blip_caption(text: str, max_words: int = BLIP_CAPTION_MAX_WORDS) -> str:
    """Lower case, the punctuation ``.!"()*#:;~`` replaced by spaces, runs of white space collapsed,
    stripped, at most ``max_words`` space-separated words (BLIP's ``pre_caption``)."""
    caption = _RUNS_OF_SPACE.sub(" ", _BLIP_PUNCTUATION.sub(" ", text.lower()))
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption
