"""Every checkpoint load of lever-plugins: one reader of torch files and one checked ``load_state_dict``.

Pure torch (no LAVIS, no transformers), so the pointer selector, the ICL stages and the runner use it
as the BLIP-2 models do. ``torch.load`` is always ``weights_only=True``: a checkpoint never runs code.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch
from torch import nn

from lever_plugins.schema import expand_path

logger = logging.getLogger(__name__)


class CheckpointMismatch(RuntimeError):
    """A checkpoint that cannot be read, or that lacks weights the model needs (beyond the keys allowed
    to be new) or holds weights it does not have; the message names the file."""


def read_torch_file(path: str, label: Optional[str] = None, expected: type = dict) -> Any:
    """The object saved in a torch file (a runner checkpoint, a state dict, a feature table: a dict unless
    ``expected`` says otherwise, e.g. ``torch.Tensor``), loaded with ``weights_only=True``.

    Raises :class:`CheckpointMismatch` naming ``label`` (default: the path) if the file is missing,
    refused by the weights-only unpickler, corrupt, or not an ``expected``.
    """
    label = label or path
    try:
        loaded = torch.load(expand_path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointMismatch(f"{label}: checkpoint file not found") from None
    except Exception as exc:  # unpickling refused or corrupt file
        raise CheckpointMismatch(f"{label}: cannot load as a weights-only torch checkpoint "
                                 f"({type(exc).__name__}: {exc})") from None
    if not isinstance(loaded, expected):
        what = "a dict (a state dict or a checkpoint)" if expected is dict else f"a {expected.__name__}"
        raise CheckpointMismatch(f"{label}: expected {what}, got {type(loaded).__name__}")
    return loaded


def load_checked(
    module: nn.Module,
    state_dict: dict,
    source: str,
    allowed_missing: Iterable[str] = (),
    ignored_unexpected: Iterable[str] = (),
    refuse_unexpected: bool = False,
    shape_settings: str = "the model settings",
) -> tuple[list[str], list[str]]:
    """``load_state_dict(strict=False)`` that refuses to hide missing weights.

    Args:
        allowed_missing: key prefixes that may be absent (weights new in this model, e.g. a plugin, or
            frozen weights a runner checkpoint does not save).
        ignored_unexpected: key prefixes of the checkpoint this model does not use (e.g. BLIP-2's ITM head).
        refuse_unexpected: other checkpoint keys the model lacks are an error too (a checkpoint of this
            model trained with another setting, e.g. with the plugin on), not a warning.
        shape_settings: the settings that decide weight shapes, named when a shape differs.

    Returns:
        ``(missing, unexpected)`` after the allowances; raises :class:`CheckpointMismatch` if any other
        key is missing (or, with ``refuse_unexpected``, unexpected).
    """
    allowed_missing, ignored_unexpected = tuple(allowed_missing), tuple(ignored_unexpected)
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # a weight of another shape: the model settings do not match the checkpoint
        shapes = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        if not shapes:
            raise
        raise CheckpointMismatch(f"{source}: {len(shapes)} weights of another shape than this model's (do {shape_settings} "
                                 f"match the checkpoint?): {'; '.join(shapes[:3])}"
                                 + (f"; ... (+{len(shapes) - 3} more)" if len(shapes) > 3 else "")) from None
    missing = [k for k in result.missing_keys if not k.startswith(allowed_missing)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(ignored_unexpected)]
    allowed = [k for k in result.missing_keys if k.startswith(allowed_missing)]
    if allowed:
        logger.info("%s: %d weights of this model not in the checkpoint, as allowed (new or frozen weights): %s",
                    source, len(allowed), _summarise(allowed))
    if unexpected and not refuse_unexpected:
        logger.warning("%s: %d unexpected keys ignored: %s", source, len(unexpected), _summarise(unexpected))
    if missing:
        raise CheckpointMismatch(f"{source}: {len(missing)} weights missing from the checkpoint: {_summarise(missing)}")
    if unexpected and refuse_unexpected:
        raise CheckpointMismatch(f"{source}: {len(unexpected)} checkpoint weights this model does not have "
                                 f"(trained with other model settings?): {_summarise(unexpected)}")
    return missing, unexpected


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")
