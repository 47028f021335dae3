"""Idempotent, crash-safe generation of an embedded demo dataset into a folder.

A marker file records the generator, its format version and parameters. It is written with
``complete: false`` before generation and rewritten complete last, so a killed generator is redone
on the next call, a finished one is never redone, and a folder holding anything else is never
written over.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from lever_plugins.io import write_json_atomic


def check_sizes(sizes: Mapping[str, Any], least: Mapping[str, int]) -> None:
    """Each ``sizes[name]`` must be an integer (not a bool) of at least ``least.get(name, 1)``.

    Raises:
        ValueError: naming the first that is not.
    """
    for label, value in sizes.items():
        minimum = least.get(label, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{label} must be an integer >= {minimum}, got {value!r}")


class DemoRoot:
    def __init__(self, root: Path, marker_name: str, owned: Sequence[str], expected_marker: dict, what: str):
        self.root = Path(root)
        self.marker_path = self.root / marker_name
        self.owned = tuple(owned)
        self.expected = {**expected_marker, "complete": True}
        self.what = what

    def _read_marker(self) -> Optional[Any]:
        try:
            return json.loads(self.marker_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def begin(self) -> bool:
        """True if the folder already holds this exact demo; otherwise clear our old files and start."""
        marker = self._read_marker()
        if marker == self.expected:
            return False
        if marker is None and self.root.is_dir() and any(self.root.iterdir()):
            raise FileExistsError(
                f"{self.root}: folder is not empty and holds no {self.marker_path.name}; refusing to write the "
                f"demo {self.what} dataset over other files (choose an empty or new folder)"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        if marker is not None:  # an older or interrupted demo: remove only what the generator writes
            for owned in self.owned:
                target = self.root / owned
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        write_json_atomic(self.marker_path, {**self.expected, "complete": False}, indent=1)
        return True

    def finish(self) -> None:
        write_json_atomic(self.marker_path, self.expected, indent=1)  # last: a killed run is regenerated next time
