"""COCO captions in the Karpathy split format (``dataset_coco.json``) as examples of the caption task kind.

File format (Karpathy's ``dataset_coco.json``; Flickr30K's ``dataset_flickr30k.json`` is the same with
``imgid`` ids)::

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "cocoid": 391895,
                 "split": "train" | "restval" | "val" | "test",
                 "sentences": [{"raw": "A man with a red helmet on a small moped.", "tokens": [...]}, ...]}, ...],
     "dataset": "coco"}

The image of an entry is ``<images_root>/<filepath>/<filename>``. Each image is one example
(:mod:`lever_plugins.icl.kinds`): keyed by ``cocoid``, its first sentence is the caption a
demonstration shows and beam search scores, and all its sentences are the references CIDEr
compares with. Errors name the file, the image and the key at fault.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

from lever_plugins.icl.data import IclDataError, VqaExample, VqaSplit, read_json

logger = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "restval", "val", "test")
_IMAGE_KEYS = ("filepath", "filename", "cocoid", "split", "sentences")


def _cocoid(value: Any, path: str, position: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise IclDataError(f"{path}: image #{position} has a 'cocoid' that is not an integer: {value!r}")
    return int(value)


def _caption(sentence: Any, path: str, cocoid: int, number: int) -> str:
    raw = sentence.get("raw") if isinstance(sentence, Mapping) else None
    if not isinstance(raw, str) or not raw.strip():
        raise IclDataError(f"{path}: cocoid {cocoid} sentence #{number} has no 'raw' caption text")
    return " ".join(raw.split())


def load_karpathy_split(name: str, json_path: str, images_root: str, splits: Sequence[str]) -> VqaSplit:
    """The images of ``json_path`` whose ``split`` is one of ``splits``, as caption examples.

    Args:
        name: split name used in messages (``train``, ``eval``).
        json_path: ``dataset_coco.json`` (Karpathy format, see the module docstring).
        images_root: folder holding each image's ``filepath`` folder.
        splits: Karpathy splits to keep (e.g. ``["train", "restval"]`` or ``["test"]``).

    Raises:
        IclDataError: naming the file and image of the first unusable entry (not an object, a missing
            key, a split outside train/restval/val/test, no sentence or one without ``raw`` text, a
            repeated cocoid), or when no image has one of ``splits``.
    """
    unknown = [s for s in splits if s not in KARPATHY_SPLITS]
    if unknown or not splits:
        raise IclDataError(f"{json_path}: splits must be some of {list(KARPATHY_SPLITS)}, got {list(splits)}")
    data = read_json(json_path, "Karpathy caption")
    if not isinstance(data, Mapping) or not isinstance(data.get("images"), list):
        raise IclDataError(f"{json_path}: expected {{'images': [...]}} (the Karpathy dataset_coco.json format)")
    examples: list[VqaExample] = []
    seen: set[int] = set()
    for position, entry in enumerate(data["images"]):
        if not isinstance(entry, Mapping):
            raise IclDataError(f"{json_path}: image #{position} is not an object")
        for key in _IMAGE_KEYS:
            if key not in entry:
                where = f"cocoid {entry['cocoid']}" if "cocoid" in entry else f"image #{position}"
                raise IclDataError(f"{json_path}: {where} has no {key!r}")
        cocoid = _cocoid(entry["cocoid"], json_path, position)
        if entry["split"] not in KARPATHY_SPLITS:
            raise IclDataError(f"{json_path}: cocoid {cocoid} has split {entry['split']!r}; expected one of {list(KARPATHY_SPLITS)}")
        if cocoid in seen:
            raise IclDataError(f"{json_path}: cocoid {cocoid} appears twice")
        seen.add(cocoid)
        if entry["split"] not in splits:
            continue
        sentences = entry["sentences"]
        if not isinstance(sentences, list) or not sentences:
            raise IclDataError(f"{json_path}: cocoid {cocoid} has no 'sentences'")
        captions = tuple(_caption(s, json_path, cocoid, number) for number, s in enumerate(sentences))
        image_path = os.path.join(images_root, str(entry["filepath"]), str(entry["filename"]))
        examples.append(VqaExample(question_id=cocoid, image_id=cocoid, question="", answer=captions[0],
                                   answers=captions, image_path=image_path))
    if not examples:
        raise IclDataError(f"{json_path}: no images with split in {list(splits)}")
    examples.sort(key=lambda ex: ex.question_id)
    logger.info("%s split: %d images (%s) from %s", name, len(examples), "+".join(splits), json_path)
    return VqaSplit(name, examples)


def caption_split(data: Any, part: str) -> VqaSplit:
    """The ``train`` (supporting) or ``eval`` split of a ``datasets.lever_coco_caption_icl`` block
    (:class:`~lever_plugins.schemas.icl.CocoCaptionIclDatasetSettings`; the demo's files when generated)."""
    from lever_plugins.schema import expand_path

    if data.generate_demo:
        from lever_plugins.datasets.demo_caption import demo_paths

        paths = demo_paths(expand_path(str(data.root)))
        json_path, images = paths["karpathy_json"], paths["images"]
    else:
        json_path, images = expand_path(str(data.karpathy_json)), expand_path(str(data.images))
    splits = data.train_splits if part == "train" else data.eval_splits
    return load_karpathy_split(part, json_path, images, splits)
