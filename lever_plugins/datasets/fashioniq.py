"""FashionIQ files, validated, as torch datasets (composed image retrieval on fashion products).

Layout under ``root`` (the official release):

* ``captions/cap.{dress,shirt,toptee}.{train,val,test}.json``: a list of entries ``{"candidate": name,
  "target": name, "captions": [two strings]}``; ``candidate`` is the reference image, the two captions
  are two annotators' descriptions of how the target differs from it. Test entries may lack
  ``target`` (the readers accept that; only train and val are used for training and scoring).
* ``image_splits/split.{category}.{split}.json``: a list of image names, the images of that category
  and split. A category's val list is its retrieval gallery.
* ``images/<name>.png``: the images (the extension SPRC and CLIP4Cir read; ``image_extension``
  changes it).

Captions (as SPRC prepares them, re-implemented here): each of the two captions has the characters
``.?, `` stripped from both ends. Evaluation uses one deterministic form, ``"<Caption 1> and <caption
2>"`` (first letter of the first caption upper-cased, the rest of it lower-cased, as Python's
``str.capitalize``). Training draws one of four forms with equal probability on every read: caption 1
and caption 2, caption 2 and caption 1, caption 1 alone, caption 2 alone (the leading caption
capitalised the same way). The result then goes through BLIP's caption processor
(:func:`~lever_plugins.datasets.text.blip_caption`), as SPRC applies ``txt_processors["eval"]`` to
every caption, in training and evaluation alike.

Every entry is checked when a split is loaded; images are checked when read. Problems raise
:class:`FashionIqDataError`, one line naming the file, the entry and what was expected. No LAVIS
import: the LAVIS builder wraps these classes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from PIL import Image

from lever_plugins.datasets.batching import CollatedDataset
from lever_plugins.datasets.files import load_image, read_json
from lever_plugins.datasets.text import blip_caption

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
FASHIONIQ_SPLITS = ("train", "val", "test")
SPLITS_WITH_OPTIONAL_TARGETS = ("test",)
DEFAULT_IMAGE_EXTENSION = ".png"
CAPTION_STRIP = ".?, "  # stripped from both ends of each caption before joining (as SPRC)

PathLike = Union[str, os.PathLike]


class FashionIqDataError(ValueError):
    """A FashionIQ file or image is missing, unreadable or not in the expected format."""


@dataclass(frozen=True)
class FashionIqTriplet:
    """One FashionIQ query: reference image + two relative captions -> target image.

    Attributes:
        category: ``dress``, ``shirt`` or ``toptee``.
        index: position of the entry in its captions file.
        reference: reference image name (the file's ``candidate``).
        target: target image name; ``None`` only for a test entry without one.
        captions: the two relative captions, as written in the file.
    """

    category: str
    index: int
    reference: str
    target: Optional[str]
    captions: tuple[str, str]


def _check(category: str, split: str) -> None:
    if category not in FASHIONIQ_CATEGORIES:
        raise ValueError(f"unknown FashionIQ category {category!r}; expected one of {', '.join(FASHIONIQ_CATEGORIES)}")
    if split not in FASHIONIQ_SPLITS:
        raise ValueError(f"unknown FashionIQ split {split!r}; expected one of {', '.join(FASHIONIQ_SPLITS)}")


def captions_file(root: PathLike, category: str, split: str) -> Path:
    """``root/captions/cap.<category>.<split>.json``."""
    _check(category, split)
    return Path(root) / "captions" / f"cap.{category}.{split}.json"


def image_split_file(root: PathLike, category: str, split: str) -> Path:
    """``root/image_splits/split.<category>.<split>.json``."""
    _check(category, split)
    return Path(root) / "image_splits" / f"split.{category}.{split}.json"


def image_file(root: PathLike, name: str, extension: str = DEFAULT_IMAGE_EXTENSION) -> Path:
    """``root/images/<name><extension>`` as an absolute path."""
    return (Path(root) / "images" / f"{name}{extension}").absolute()


def _read_json(path: Path) -> Any:
    return read_json(path, FashionIqDataError, "file not found (expected the FashionIQ layout under the dataset root)")


def load_fashioniq_image_split(root: PathLike, category: str, split: str) -> list[str]:
    """The image names of ``image_splits/split.<category>.<split>.json``, in file order.

    Raises:
        FashionIqDataError: not a JSON list of non-empty strings, or a name listed twice.
    """
    path = image_split_file(root, category, split)
    names = _read_json(path)
    if not isinstance(names, list):
        raise FashionIqDataError(f"{path}: expected a JSON list of image names, got {type(names).__name__}")
    seen: dict[str, int] = {}
    for position, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise FashionIqDataError(f"{path}: item {position}: expected an image name string, got {name!r}")
        if name in seen:
            raise FashionIqDataError(f"{path}: item {position}: image {name!r} is listed twice (first at item {seen[name]})")
        seen[name] = position
    return list(names)


def _entry_error(path: Path, index: int, what: str) -> FashionIqDataError:
    return FashionIqDataError(f"{path}: entry {index}: {what}")


def _parse_entry(
    path: Path, index: int, entry: Any, category: str, split: str, images: set[str], split_path: Path
) -> FashionIqTriplet:
    if not isinstance(entry, dict):
        raise _entry_error(path, index, f"expected a JSON object, got {type(entry).__name__}")
    target_optional = split in SPLITS_WITH_OPTIONAL_TARGETS
    for key in ("candidate", "captions") + (() if target_optional else ("target",)):
        if key not in entry:
            raise _entry_error(path, index, f"missing {key!r}")
    named = [("candidate", entry["candidate"])]
    if "target" in entry:
        named.append(("target", entry["target"]))
    for key, name in named:
        if not isinstance(name, str) or not name:
            raise _entry_error(path, index, f"{key!r} must be an image name string, got {name!r}")
    captions = entry["captions"]
    if not isinstance(captions, list) or len(captions) != 2 or not all(isinstance(c, str) for c in captions):
        raise _entry_error(path, index, f"'captions' must be a list of two strings, got {captions!r}")
    for key, name in named:
        if name not in images:
            raise _entry_error(path, index, f"{key} {name!r} is not listed in {split_path}")
    return FashionIqTriplet(
        category=category, index=index, reference=entry["candidate"], target=entry.get("target"),
        captions=(captions[0], captions[1]),
    )


def load_fashioniq_triplets(root: PathLike, category: str, split: str) -> list[FashionIqTriplet]:
    """Read and validate ``captions/cap.<category>.<split>.json`` against the split's image list.

    Raises:
        FashionIqDataError: unreadable JSON; an entry without ``candidate``/``captions`` (or
            ``target`` outside test); ``captions`` not a list of two strings; a name not in the
            category's ``image_splits`` file for that split.
    """
    split_path = image_split_file(root, category, split)
    images = set(load_fashioniq_image_split(root, category, split))
    path = captions_file(root, category, split)
    entries = _read_json(path)
    if not isinstance(entries, list):
        raise FashionIqDataError(f"{path}: expected a JSON list of caption entries, got {type(entries).__name__}")
    return [_parse_entry(path, index, entry, category, split, images, split_path) for index, entry in enumerate(entries)]


def _stripped(caption: str) -> str:
    return caption.strip(CAPTION_STRIP)


def eval_caption(captions: Sequence[str]) -> str:
    """The deterministic evaluation join: ``"<Caption 1> and <caption 2>"`` (before BLIP processing)."""
    first, second = captions
    return f"{_stripped(first).capitalize()} and {_stripped(second)}"


def train_caption_forms(captions: Sequence[str]) -> tuple[str, str, str, str]:
    """The four training forms (before BLIP processing): 1 and 2, 2 and 1, 1 alone, 2 alone."""
    first, second = (_stripped(c) for c in captions)
    return (
        f"{first.capitalize()} and {second}",
        f"{second.capitalize()} and {first}",
        first.capitalize(),
        second.capitalize(),
    )


def train_caption(captions: Sequence[str], choice: Optional[int] = None) -> str:
    """One of :func:`train_caption_forms`, drawn uniformly with torch's RNG unless ``choice`` (0-3) is given.

    torch's RNG is what DataLoader workers seed from the loader's generator, so with workers the
    draws are a function of the run's seed and epoch.
    """
    if choice is None:
        choice = int(torch.randint(4, ()).item())
    return train_caption_forms(captions)[choice]


class FashionIqTripletDataset(CollatedDataset):
    """FashionIQ queries of one split over one or more categories (concatenated in the given order).

    Item: ``{"reference_image": (3, H, W) tensor, "target_image": (3, H, W) tensor (if
    ``load_target_image``), "text_input": str, "pair_id": int, "category": str, "reference_name": str,
    "target_name": str}``. ``pair_id`` is the item's position in this dataset (FashionIQ has no ids of
    its own); ``text_input`` is the joined, BLIP-processed caption (randomised when ``train``).

    Args:
        root: dataset root.
        split: ``train``, ``val`` or ``test``.
        image_transform: PIL RGB image -> tensor.
        categories: categories to read (default all three).
        train: draw one of SPRC's four caption forms per read (default: ``split == "train"``);
            otherwise the deterministic evaluation join.
        load_target_image: read the target image (default: ``train``). Evaluation needs only the
            target's name, the category gallery holds its image.
        text_transform: applied to the joined caption (default: :func:`blip_caption`).
        image_extension: file extension of the images under ``root/images``.
        max_samples_per_category: keep only the first N entries of each category (smoke runs).
    """

    def __init__(
        self,
        root: PathLike,
        split: str,
        image_transform: Callable[[Image.Image], Any],
        *,
        categories: Sequence[str] = FASHIONIQ_CATEGORIES,
        train: Optional[bool] = None,
        load_target_image: Optional[bool] = None,
        text_transform: Optional[Callable[[str], str]] = blip_caption,
        image_extension: str = DEFAULT_IMAGE_EXTENSION,
        max_samples_per_category: Optional[int] = None,
    ) -> None:
        if not categories:
            raise ValueError("categories must name at least one FashionIQ category")
        if len(set(categories)) != len(categories):
            raise ValueError(f"categories repeat a category: {list(categories)}")
        self.root = Path(root)
        self.split = split
        self.categories = tuple(categories)
        self.train = split == "train" if train is None else bool(train)
        self.load_target_image = self.train if load_target_image is None else bool(load_target_image)
        self.image_transform = image_transform
        self.text_transform = text_transform
        self.image_extension = image_extension
        self.triplets: list[FashionIqTriplet] = []
        for category in self.categories:
            triplets = load_fashioniq_triplets(root, category, split)
            self.triplets.extend(triplets if max_samples_per_category is None else triplets[:max_samples_per_category])
        if self.load_target_image and any(t.target is None for t in self.triplets):
            raise ValueError(f"FashionIQ {split}: some entries have no target image to load")
        names = {t.reference for t in self.triplets} | {t.target for t in self.triplets if t.target is not None}
        self.image_paths: dict[str, Path] = {name: image_file(root, name, image_extension) for name in sorted(names)}

    def __len__(self) -> int:
        return len(self.triplets)

    def category_indices(self, category: str) -> list[int]:
        """Positions of ``category``'s queries in this dataset."""
        return [i for i, t in enumerate(self.triplets) if t.category == category]

    def caption(self, index: int) -> str:
        """The text input of item ``index`` (a fresh random draw each call when ``train``)."""
        captions = self.triplets[index].captions
        joined = train_caption(captions) if self.train else eval_caption(captions)
        return joined if self.text_transform is None else self.text_transform(joined)

    def _image(self, triplet: FashionIqTriplet, name: str, role: str) -> Any:
        referenced_by = f"{captions_file(self.root, triplet.category, self.split)} entry {triplet.index} {role}"
        return self.image_transform(load_image(self.image_paths[name], referenced_by, FashionIqDataError))

    def __getitem__(self, index: int) -> dict[str, Any]:
        triplet = self.triplets[index]
        item: dict[str, Any] = {
            "reference_image": self._image(triplet, triplet.reference, "candidate"),
            "text_input": self.caption(index),
            "pair_id": index,
            "category": triplet.category,
            "reference_name": triplet.reference,
        }
        if triplet.target is not None:
            item["target_name"] = triplet.target
            if self.load_target_image:
                item["target_image"] = self._image(triplet, triplet.target, "target")
        return item


class FashionIqGalleryDataset(CollatedDataset):
    """Every image of one category's split, in ``image_splits`` file order: that category's gallery.

    Item: ``{"image": (3, H, W) tensor, "image_name": str}``.

    Args:
        root: dataset root.
        category: ``dress``, ``shirt`` or ``toptee``.
        split: ``train``, ``val`` or ``test``.
        image_transform: PIL RGB image -> tensor.
        image_extension: file extension of the images under ``root/images``.
    """

    def __init__(
        self,
        root: PathLike,
        category: str,
        split: str,
        image_transform: Callable[[Image.Image], Any],
        *,
        image_extension: str = DEFAULT_IMAGE_EXTENSION,
    ) -> None:
        self.root = Path(root)
        self.category = category
        self.split = split
        self.image_names = load_fashioniq_image_split(root, category, split)
        self.image_transform = image_transform
        self.image_extension = image_extension
        self._split_file = image_split_file(root, category, split)

    def __len__(self) -> int:
        return len(self.image_names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.image_names[index]
        path = image_file(self.root, name, self.image_extension)
        image = load_image(path, f"{self._split_file} image {name!r}", FashionIqDataError)
        return {"image": self.image_transform(image), "image_name": name}
