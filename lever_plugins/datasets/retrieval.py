"""Image-text retrieval data (Flickr30K / MS-COCO Karpathy splits) with one dense caption per image.

Files, in LAVIS's retrieval annotation format (what ``lavis/configs/datasets/{flickr30k,coco}``
download), paths relative to an image folder:

* train: a JSON list of ``{"image": "rel/path.jpg", "caption": "one caption", "image_id": str | int}``,
  one entry per (image, caption); the captions of one image share ``image_id``.
* val / test: a JSON list of ``{"image": "rel/path.jpg", "caption": ["caption 1", ..., "caption 5"]}``,
  one entry per image.
* dense captions (SEPS): one JSON object for all splits, ``{"<image path exactly as in the
  annotations>": "a long, detailed description of the image"}``. Any captioning VLM can write it (see
  the README); it belongs to the *image*, so retrieval never sees a caption's ground-truth pairing.

Everything is checked when a split is loaded, so a bad file fails at start-up rather than hours into
training: unreadable JSON, an entry without ``image``/``caption``/``image_id`` or with the wrong type,
an image file that does not exist, an image without a dense caption (unless the recipe says
``missing_dense_caption: empty``). Images that do not decode fail when read. Each problem raises
:class:`RetrievalDataError` with one line naming the file and the entry. No LAVIS import here.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence, Union

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from lever_plugins.datasets.batching import CollatedDataset
from lever_plugins.datasets.files import load_image, one_line
from lever_plugins.datasets.files import read_json as _read_json
from lever_plugins.datasets.transforms import CLIP_MEAN, CLIP_STD, to_rgb

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
MissingDensePolicy = Literal["error", "empty"]
Augment = Literal["none", "crop", "crop_flip"]


class RetrievalDataError(ValueError):
    """A retrieval annotation, dense-caption or image file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class TrainEntry:
    """One training pair: ``image`` (path relative to the image folder), ``caption``, ``image_id``."""

    image: str
    caption: str
    image_id: Union[str, int]


@dataclass(frozen=True)
class EvalEntry:
    """One evaluation image with its captions."""

    image: str
    captions: tuple[str, ...]


def read_json(path: PathLike, what: str) -> Any:
    """Parse a JSON file; errors name the file (and line/column for bad JSON)."""
    return _read_json(path, RetrievalDataError, f"{what} file not found")


def _entry_error(path: Path, index: int, entry: Any, what: str) -> RetrievalDataError:
    image = entry.get("image") if isinstance(entry, dict) else None
    label = f"entry {index} (image {image!r})" if isinstance(image, str) else f"entry {index}"
    return RetrievalDataError(f"{path}: {label}: {what}")


def _check_image_field(path: Path, index: int, entry: Any) -> str:
    if not isinstance(entry, dict):
        raise _entry_error(path, index, entry, f"expected a JSON object, got {type(entry).__name__}")
    if "image" not in entry:
        raise _entry_error(path, index, entry, "missing 'image' (the image path relative to the image folder)")
    image = entry["image"]
    if not isinstance(image, str) or not image.strip():
        raise _entry_error(path, index, entry, f"'image' must be a non-empty path string, got {image!r}")
    return image


def _caption(path: Path, index: int, entry: dict, value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _entry_error(path, index, entry, f"{where} must be a non-empty string, got {value!r}")
    return one_line(value)


def _entries(path: PathLike) -> tuple[Path, list]:
    path = Path(path)
    data = read_json(path, "annotation")
    if not isinstance(data, list):
        raise RetrievalDataError(f"{path}: expected a JSON list of annotation entries, got {type(data).__name__}")
    if not data:
        raise RetrievalDataError(f"{path}: the annotation list is empty")
    return path, data


def load_train_annotations(path: PathLike) -> list[TrainEntry]:
    """Read and check a training annotation file (one entry per (image, caption) pair)."""
    path, data = _entries(path)
    out = []
    for index, entry in enumerate(data):
        image = _check_image_field(path, index, entry)
        if "caption" not in entry:
            raise _entry_error(path, index, entry, "missing 'caption'")
        caption = _caption(path, index, entry, entry["caption"], "'caption'")
        if "image_id" not in entry:
            raise _entry_error(path, index, entry, "missing 'image_id' (equal for all captions of one image)")
        image_id = entry["image_id"]
        if isinstance(image_id, bool) or not isinstance(image_id, (str, int)):
            raise _entry_error(path, index, entry, f"'image_id' must be a string or an integer, got {image_id!r}")
        out.append(TrainEntry(image=image, caption=caption, image_id=image_id))
    return out


def load_eval_annotations(path: PathLike) -> list[EvalEntry]:
    """Read and check a val/test annotation file (one entry per image with a list of captions)."""
    path, data = _entries(path)
    out = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(data):
        image = _check_image_field(path, index, entry)
        if "caption" not in entry:
            raise _entry_error(path, index, entry, "missing 'caption' (a list of the image's captions)")
        captions = entry["caption"]
        if not isinstance(captions, list) or not captions:
            raise _entry_error(path, index, entry, f"'caption' must be a non-empty list of strings, got {captions!r}")
        texts = tuple(_caption(path, index, entry, c, f"'caption'[{i}]") for i, c in enumerate(captions))
        if image in seen:
            raise _entry_error(path, index, entry, f"image repeats entry {seen[image]} (one entry per image)")
        seen[image] = index
        out.append(EvalEntry(image=image, captions=texts))
    return out


def load_dense_captions(path: PathLike) -> dict[str, str]:
    """Read the dense-caption file: a JSON object image path -> dense caption (string)."""
    path = Path(path)
    data = read_json(path, "dense-caption")
    if not isinstance(data, dict):
        raise RetrievalDataError(
            f'{path}: expected a JSON object {{"<image path>": "dense caption"}}, got {type(data).__name__}'
        )
    for image, text in data.items():
        if not isinstance(text, str):
            raise RetrievalDataError(f"{path}: image {image!r}: the dense caption must be a string, got {text!r}")
    return {image: one_line(text) for image, text in data.items()}


def dense_captions_for(
    images: Sequence[str],
    dense: dict[str, str],
    *,
    dense_path: PathLike,
    annotation_path: PathLike,
    policy: MissingDensePolicy = "error",
    policy_key: str = "missing_dense_caption",
) -> list[str]:
    """The dense caption of each image in ``images`` (annotation order).

    Args:
        images: image paths as written in the annotation file (repeats allowed).
        dense: from :func:`load_dense_captions`.
        dense_path, annotation_path: for the messages.
        policy: ``"error"``: an image without a dense caption (absent or blank) raises; ``"empty"``: it gets ``""``
            (a warning counts them).
        policy_key: the recipe key named in the error's hint.

    Raises:
        RetrievalDataError: with ``policy="error"``, naming the first image without a dense caption.
    """
    # A blank entry (e.g. left by a failed captioning run) is as missing as an absent one.
    missing = [(i, image) for i, image in enumerate(images) if not dense.get(image, "").strip()]
    if missing:
        distinct = len({image for _, image in missing})
        total = len(set(images))
        first_index, first_image = missing[0]
        if policy == "error":
            raise RetrievalDataError(
                f"{dense_path}: no dense caption for image {first_image!r} ({annotation_path} entry {first_index}; "
                f"absent or blank); {distinct} of {total} images lack one. Add them, or set {policy_key}: empty to use an empty dense caption"
            )
        logger.warning(
            "%s: %d of %d images of %s have no dense caption; using an empty one (%s: empty)",
            dense_path, distinct, total, annotation_path, policy_key,
        )
    return [dense[image] if dense.get(image, "").strip() else "" for image in images]


def check_images_exist(image_root: Path, images: Sequence[str], annotation_path: PathLike) -> None:
    """Raise naming the first annotation entry whose image file does not exist."""
    checked: set[str] = set()
    for index, image in enumerate(images):
        if image in checked:
            continue
        checked.add(image)
        if not (image_root / image).is_file():
            raise RetrievalDataError(
                f"{annotation_path}: entry {index}: image file not found: {image_root / image} "
                "(image paths are relative to the dataset's `images` folder)"
            )


def load_retrieval_image(path: Path, referenced_by: str) -> Image.Image:
    """Open and fully decode one image as RGB; errors name the file and who referenced it."""
    return load_image(path, referenced_by, RetrievalDataError)


def retrieval_image_transform(image_size: int, augment: Augment = "none") -> T.Compose:
    """PIL image -> normalised ``(3, image_size, image_size)`` tensor (BLIP-2's CLIP normalisation).

    ``none`` (evaluation): bicubic resize to a square. ``crop``: random resized crop, scale 0.5-1
    (BLIP's training crop). ``crop_flip``: plus a horizontal flip (LAPS/BLIP; do not use it when
    captions say "left"/"right").
    """
    if augment not in ("none", "crop", "crop_flip"):
        raise ValueError(f"augment must be 'none', 'crop' or 'crop_flip', got {augment!r}")
    steps: list[Any] = [to_rgb]
    if augment == "none":
        steps.append(T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC))
    else:
        steps.append(T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC))
        if augment == "crop_flip":
            steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    return T.Compose(steps)


class _AnnotatedImages(CollatedDataset):
    """Entries of one annotation file, their images under ``image_root`` and one dense caption each."""

    def __init__(self, image_root: PathLike, entries: Sequence, dense_texts: Sequence[str],
                 transform: Callable[[Image.Image], Any], annotation_path: PathLike, counted: str) -> None:
        if len(dense_texts) != len(entries):
            raise ValueError(f"{len(entries)} {counted} but {len(dense_texts)} dense captions")
        self.image_root = Path(image_root)
        self.entries = list(entries)
        self.transform = transform
        self.annotation_path = annotation_path

    def __len__(self) -> int:
        return len(self.entries)

    def _image(self, relative: str, index: int) -> Any:
        """``(3, H, W)``: the transformed image of entry ``index``; errors name the annotation file and entry."""
        return self.transform(load_retrieval_image(self.image_root / relative, f"{self.annotation_path} entry {index}"))


class RetrievalTrainDataset(_AnnotatedImages):
    """(image, caption, dense caption of the image, image index) training samples.

    Item: ``{"image": (3, H, W), "text_input": str, "dense_text": str, "image_id": int}`` where
    ``image_id`` is the image's index in order of first appearance (LAVIS's ``RetrievalDataset``
    convention), equal for every caption of one image.

    Args:
        image_root: folder the annotation paths are relative to.
        entries: from :func:`load_train_annotations`.
        dense_texts: dense caption of each entry's image (from :func:`dense_captions_for`).
        transform: PIL RGB image -> tensor.
        annotation_path: for error messages.
    """

    def __init__(
        self,
        image_root: PathLike,
        entries: Sequence[TrainEntry],
        dense_texts: Sequence[str],
        transform: Callable[[Image.Image], Any],
        annotation_path: PathLike = "<annotations>",
    ) -> None:
        super().__init__(image_root, entries, dense_texts, transform, annotation_path, "entries")
        self.dense_texts = list(dense_texts)
        self.image_index: dict[Union[str, int], int] = {}
        for entry in self.entries:
            self.image_index.setdefault(entry.image_id, len(self.image_index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        return {
            "image": self._image(entry.image, index),
            "text_input": entry.caption,
            "dense_text": self.dense_texts[index],
            "image_id": self.image_index[entry.image_id],
        }


class RetrievalEvalDataset(_AnnotatedImages):
    """The images of a val/test split, with every caption and each image's dense caption as attributes.

    Items are images: ``{"image": (3, H, W), "index": int}``. Attributes (LAVIS's
    ``RetrievalEvalDataset`` names): ``image`` (paths), ``text`` (all captions, image by image),
    ``txt2img`` (image index of each caption), ``img2txt`` (caption indices of each image), plus
    ``dense_text`` (one per image), ``split``, and ``protocol`` / ``fold_images`` set by the builder
    (``"coco"`` adds the 1K-fold metrics).

    Args:
        image_root: folder the annotation paths are relative to.
        entries: from :func:`load_eval_annotations`.
        dense_texts: dense caption of each image.
        transform: PIL RGB image -> tensor.
        split: split name.
        annotation_path: for error messages.
    """

    def __init__(
        self,
        image_root: PathLike,
        entries: Sequence[EvalEntry],
        dense_texts: Sequence[str],
        transform: Callable[[Image.Image], Any],
        split: str = "test",
        annotation_path: PathLike = "<annotations>",
    ) -> None:
        super().__init__(image_root, entries, dense_texts, transform, annotation_path, "images")
        self.split = split
        self.image = [entry.image for entry in self.entries]
        self.dense_text = list(dense_texts)
        self.text: list[str] = []
        self.txt2img: list[int] = []
        self.img2txt: list[list[int]] = []
        for image_index, entry in enumerate(self.entries):
            self.img2txt.append(list(range(len(self.text), len(self.text) + len(entry.captions))))
            self.text.extend(entry.captions)
            self.txt2img.extend([image_index] * len(entry.captions))
        self.protocol = "flickr"
        self.fold_images: Optional[int] = None

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self._image(self.image[index], index), "index": index}


def resolve_under(root: PathLike, value: str) -> Path:
    """``value`` relative to ``root`` (``~`` expanded; an absolute ``value`` is kept)."""
    return Path(root) / os.path.expanduser(value)


def build_split(
    split: str,
    *,
    root: PathLike,
    images: str,
    annotation_file: str,
    dense: dict[str, str],
    dense_path: PathLike,
    image_size: int,
    train_augment: Augment = "none",
    missing_dense_caption: MissingDensePolicy = "error",
    policy_key: str = "missing_dense_caption",
    max_train_samples: Optional[int] = None,
    max_eval_images: Optional[int] = None,
) -> CollatedDataset:
    """One split as a dataset: :class:`RetrievalTrainDataset` for ``train``, else :class:`RetrievalEvalDataset`.

    Limits (``max_*``) are applied before the dense captions and image files are checked.
    """
    image_root = resolve_under(root, images)
    if not image_root.is_dir():
        raise RetrievalDataError(f"{image_root}: image folder not found (the dataset's `images` key)")
    annotation_path = resolve_under(root, annotation_file)
    train = split == "train"
    entries: Sequence[Union[TrainEntry, EvalEntry]] = (
        load_train_annotations(annotation_path) if train else load_eval_annotations(annotation_path)
    )
    limit = max_train_samples if train else max_eval_images
    if limit is not None:
        entries = entries[:limit]
    paths = [entry.image for entry in entries]
    check_images_exist(image_root, paths, annotation_path)
    dense_texts = dense_captions_for(
        paths, dense, dense_path=dense_path, annotation_path=annotation_path, policy=missing_dense_caption,
        policy_key=policy_key,
    )
    if train:
        return RetrievalTrainDataset(
            image_root, entries, dense_texts, retrieval_image_transform(image_size, train_augment), annotation_path
        )
    return RetrievalEvalDataset(
        image_root, entries, dense_texts, retrieval_image_transform(image_size, "none"), split, annotation_path
    )
