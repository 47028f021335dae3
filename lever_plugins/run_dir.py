"""The files of a run's output folder that more than one layer writes (pure Python).

A resumed run whose recipe changed must not touch the run's ``recipe.yaml`` until the checkpoint has
loaded into the model the new recipe builds: the new recipe waits as ``recipe.pending.yaml`` and
:func:`commit_pending_recipe` (called by the runner once the resume succeeded) keeps the old one aside
and puts the new one in place. A start that fails before then leaves the run as it was.
"""
from __future__ import annotations

import datetime
import logging
import os

from lever_plugins.io import write_text_atomic

RECIPE_FILE = "recipe.yaml"
PENDING_RECIPE_FILE = "recipe.pending.yaml"

logger = logging.getLogger(__name__)


def free_name(path: str) -> str:
    """``path``, or the first of ``path-2``, ``path-3``... (before a ``.yaml`` suffix) that does not exist."""
    root, ext = os.path.splitext(path) if path.endswith(".yaml") else (path, "")
    candidate, counter = path, 1
    while os.path.exists(candidate):
        counter += 1
        candidate = f"{root}-{counter}{ext}"
    return candidate


def commit_pending_recipe(output_dir: str) -> None:
    """Make a waiting ``recipe.pending.yaml`` the run's recipe; the previous one is kept as
    ``recipe.before-resume-<time>.yaml``. Nothing happens without a pending recipe."""
    pending = os.path.join(output_dir, PENDING_RECIPE_FILE)
    if not os.path.isfile(pending):
        return
    current = os.path.join(output_dir, RECIPE_FILE)
    if os.path.isfile(current):
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        kept = free_name(os.path.join(output_dir, f"recipe.before-resume-{stamp}.yaml"))
        with open(current, encoding="utf-8") as handle:
            write_text_atomic(kept, handle.read())
        logger.warning("the recipe differs from the run's; the previous one is kept as %s", kept)
    os.replace(pending, current)
