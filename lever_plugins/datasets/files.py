"""Reading dataset files with errors that name the file: JSON, and images decoded strictly.

LAVIS sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`` when it is imported (in its COCO caption
dataset module), after which Pillow silently pads truncated files with grey. A corrupt image must be
an error naming the file instead, whatever LAVIS did to the global flag.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Union

from PIL import Image, ImageFile

PathLike = Union[str, os.PathLike]
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def read_json(path: PathLike, error_cls: type[Exception], missing_hint: str = "file not found") -> Any:
    """Parse a JSON file; errors (``error_cls``) name the file, and line/column for bad JSON."""
    path = Path(path)
    try:
        with open(path, "r", encoding="utf-8") as stream:
            return json.load(stream)
    except FileNotFoundError:
        raise error_cls(f"{path}: {missing_hint}") from None
    except json.JSONDecodeError as error:
        raise error_cls(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise error_cls(f"{path}: cannot read file ({one_line(error)})") from None


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def load_image(path: PathLike, referenced_by: str, error_cls: type[Exception]) -> Image.Image:
    """Open and fully decode an image as RGB; errors (``error_cls``) name the file and who needs it."""
    try:
        with strict_decoding(), Image.open(path) as image:
            image.load()  # PIL decodes lazily; force it so truncated files fail here
            return image.convert("RGB")
    except FileNotFoundError:
        raise error_cls(f"{path}: image file is missing (referenced by {referenced_by})") from None
    except DECODE_ERRORS as error:
        raise error_cls(
            f"{path}: cannot decode image ({type(error).__name__}: {one_line(error)}) (referenced by {referenced_by})"
        ) from None
