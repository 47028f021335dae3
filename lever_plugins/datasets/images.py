"""Strict image decoding shared by every dataset.

LAVIS sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`` when it is imported (in its COCO caption
dataset module), after which Pillow silently pads truncated files with grey. A corrupt image must be
an error naming the file instead, whatever LAVIS did to the global flag.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Union

from PIL import Image, ImageFile


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def decode_rgb(path: Union[str, Path]) -> Image.Image:
    """Open and fully decode an image as RGB; raises ``FileNotFoundError`` or a decoding error."""
    with strict_decoding(), Image.open(path) as image:
        image.load()  # PIL decodes lazily; force it so truncated files fail here
        return image.convert("RGB")


DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
