"""Atomic file output: every file we write appears whole or not at all.

A run killed mid-write (SIGKILL, OOM, a pre-empted cluster job) must never leave a truncated
checkpoint, recipe, metrics file, submission or figure behind. Writers produce the file under a
temporary name in the same directory and rename it into place (``os.replace`` is atomic on POSIX).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        yield tmp_name
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as stream:
        stream.write(data)


def write_png_atomic(path: PathLike, image: Any) -> None:
    """``image`` (a PIL image) encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def write_text_atomic(path: PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: PathLike, payload: Any, indent: Union[int, None] = None) -> None:
    write_text_atomic(path, json.dumps(payload, indent=indent) + "\n")
