"""CIRR (Composed Image Retrieval on Real-life images) files, validated, as torch datasets.

Layout under ``root`` (the official release, rc2):

* ``captions/cap.rc2.{train,val,test1}.json``: a list of entries ``{"pairid": int, "reference": name,
  "target_hard": name, "target_soft": {name: score}, "caption": str, "img_set": {"id": int,
  "members": [6 names], "reference_rank": int, "target_rank": int}}``; test1 entries carry no
  ``target_hard``/``target_soft``.
* ``image_splits/split.rc2.{train,val,test1}.json``: image name -> path relative to the image root
  (``"./train/34/train-10108-0-img0.png"``, ``"./dev/dev-0-0-img0.png"``). The image root is
  ``root`` itself, or ``root/img_raw`` when that folder exists (the official release's layout), or
  whatever ``image_root`` says.

Every entry is checked when the split is loaded, so a bad file fails at start-up rather than hours
into training; images are checked when read. Problems raise :class:`CirrDataError`, one line naming
the file, the entry and what was expected. No LAVIS import: the LAVIS builder wraps these classes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from PIL import Image

from lever_plugins.datasets.batching import CollatedDataset
from lever_plugins.datasets.files import load_image, read_json

CIRR_SPLITS = ("train", "val", "test1")
SPLITS_WITHOUT_TARGETS = ("test1",)

PathLike = Union[str, os.PathLike]


class CirrDataError(ValueError):
    """A CIRR file or image is missing, unreadable or not in the expected format."""


@dataclass(frozen=True)
class CirrTriplet:
    """One CIRR query: reference image + modification caption -> target image.

    Attributes:
        pair_id: CIRR ``pairid`` (the key of test-server submissions).
        reference: reference image name.
        target: target image name (``target_hard``); ``None`` on test1.
        caption: modification text.
        group_members: names in ``img_set.members`` (reference included), the subset-recall pool.
    """

    pair_id: int
    reference: str
    target: Optional[str]
    caption: str
    group_members: tuple[str, ...]


def _check_split(split: str) -> None:
    if split not in CIRR_SPLITS:
        raise ValueError(f"unknown CIRR split {split!r}; expected one of {', '.join(CIRR_SPLITS)}")


def captions_file(root: PathLike, split: str) -> Path:
    """``root/captions/cap.rc2.<split>.json``."""
    _check_split(split)
    return Path(root) / "captions" / f"cap.rc2.{split}.json"


def image_split_file(root: PathLike, split: str) -> Path:
    """``root/image_splits/split.rc2.<split>.json``."""
    _check_split(split)
    return Path(root) / "image_splits" / f"split.rc2.{split}.json"


def _read_json(path: Path) -> Any:
    return read_json(path, CirrDataError, "file not found (expected the CIRR rc2 layout under the dataset root)")


def resolve_image_root(root: PathLike, image_root: Optional[PathLike] = None) -> Path:
    """Folder the ``image_splits`` paths are relative to: ``image_root``, else ``root/img_raw`` if it
    exists (official layout), else ``root``."""
    if image_root is not None:
        return Path(image_root).absolute()
    official = Path(root) / "img_raw"
    return (official if official.is_dir() else Path(root)).absolute()


def load_cirr_image_split(
    root: PathLike, split: str, *, image_root: Optional[PathLike] = None
) -> dict[str, Path]:
    """Image name -> absolute image path for one split.

    Args:
        root: dataset root (holds ``image_splits/``).
        split: ``train``, ``val`` or ``test1``.
        image_root: folder the split file's paths are relative to (see :func:`resolve_image_root`).

    Returns:
        A dict in file order. Files are not opened here; :func:`load_cirr_image` checks them.
    """
    path = image_split_file(root, split)
    mapping = _read_json(path)
    if not isinstance(mapping, dict):
        raise CirrDataError(f"{path}: expected a JSON object image name -> relative path, got {type(mapping).__name__}")
    base = resolve_image_root(root, image_root)
    paths: dict[str, Path] = {}
    for name, relative in mapping.items():
        if not isinstance(relative, str) or not relative:
            raise CirrDataError(f"{path}: image {name!r}: expected a relative path string, got {relative!r}")
        paths[name] = Path(os.path.normpath(base / relative))
    return paths


def _entry_error(path: Path, index: int, entry: Any, what: str) -> CirrDataError:
    pair_id = entry.get("pairid", "?") if isinstance(entry, dict) else "?"
    return CirrDataError(f"{path}: entry {index} (pairid {pair_id}): {what}")


def _parse_entry(
    path: Path, index: int, entry: Any, split: str, images: dict[str, Path], split_path: Path
) -> CirrTriplet:
    if not isinstance(entry, dict):
        raise _entry_error(path, index, entry, f"expected a JSON object, got {type(entry).__name__}")
    pair_id = entry.get("pairid")
    if isinstance(pair_id, bool) or not isinstance(pair_id, int):
        raise _entry_error(path, index, entry, f"'pairid' must be an integer, got {pair_id!r}")
    needs_target = split not in SPLITS_WITHOUT_TARGETS
    required = ("reference", "caption", "img_set") + (("target_hard",) if needs_target else ())
    for key in required:
        if key not in entry:
            raise _entry_error(path, index, entry, f"missing {key!r}")
    for key in ("reference", "caption") + (("target_hard",) if needs_target else ()):
        if not isinstance(entry[key], str):
            raise _entry_error(path, index, entry, f"{key!r} must be a string, got {entry[key]!r}")
    img_set = entry["img_set"]
    members = img_set.get("members") if isinstance(img_set, dict) else None
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        raise _entry_error(path, index, entry, f"'img_set.members' must be a non-empty list of image names, got {members!r}")

    reference = entry["reference"]
    target = entry["target_hard"] if needs_target else None
    named = [("reference", reference)] + ([("target_hard", target)] if needs_target else [])
    named += [("img_set.members", m) for m in members]
    for role, name in named:
        if name not in images:
            raise _entry_error(path, index, entry, f"{role} {name!r} is not listed in {split_path}")
    for role, name in named[: 2 if needs_target else 1]:
        if name not in members:
            raise _entry_error(path, index, entry, f"{role} {name!r} is not among img_set.members {members!r}")
    if needs_target and target == reference:
        raise _entry_error(path, index, entry, f"target_hard equals the reference {reference!r}")
    return CirrTriplet(
        pair_id=pair_id, reference=reference, target=target, caption=entry["caption"], group_members=tuple(members)
    )


def _load(
    root: PathLike, split: str, image_root: Optional[PathLike] = None
) -> tuple[list[CirrTriplet], dict[str, Path]]:
    images = load_cirr_image_split(root, split, image_root=image_root)
    path = captions_file(root, split)
    entries = _read_json(path)
    if not isinstance(entries, list):
        raise CirrDataError(f"{path}: expected a JSON list of caption entries, got {type(entries).__name__}")
    split_path = image_split_file(root, split)
    triplets: list[CirrTriplet] = []
    seen: dict[int, int] = {}
    for index, entry in enumerate(entries):
        triplet = _parse_entry(path, index, entry, split, images, split_path)
        if triplet.pair_id in seen:
            raise _entry_error(path, index, entry, f"pairid repeats entry {seen[triplet.pair_id]}")
        seen[triplet.pair_id] = index
        triplets.append(triplet)
    return triplets, images


def load_cirr_triplets(root: PathLike, split: str) -> list[CirrTriplet]:
    """Read and validate ``captions/cap.rc2.<split>.json`` against the split's image list.

    Raises:
        CirrDataError: unreadable JSON; an entry without ``pairid``/``reference``/``caption``/
            ``img_set.members`` (or ``target_hard`` outside test1); a name not in the split's
            ``image_splits`` file; reference or target outside ``img_set.members``; repeated pairid.
    """
    return _load(root, split)[0]


def load_cirr_image(path: Path, referenced_by: str) -> Image.Image:
    """Open and fully decode one image as RGB.

    Args:
        path: image file.
        referenced_by: who needs it (file and entry), for the error message.

    Raises:
        CirrDataError: the file is missing or does not decode.
    """
    return load_image(path, referenced_by, CirrDataError)


class CirrTripletDataset(CollatedDataset):
    """CIRR queries as training/evaluation samples.

    Item: ``{"reference_image": (3, H, W) tensor, "target_image": (3, H, W) tensor, "text_input":
    str, "pair_id": int, "reference_name": str, "target_name": str}``; on test1 (no targets) the two
    target keys are absent. Batches with :func:`torch.utils.data.default_collate` (``collater``).

    Args:
        root: dataset root.
        split: ``train``, ``val`` or ``test1``.
        image_transform: PIL RGB image -> tensor, e.g. :func:`~lever_plugins.datasets.transforms.cir_image_transform`.
        text_transform: applied to each caption (e.g. a LAVIS text processor); identity if None.
        load_target_image: read the target image (default: whenever the split has targets). Retrieval
            evaluation only needs the target's name (the gallery holds its image), so it can skip it.
        image_root: see :func:`resolve_image_root`.
    """

    def __init__(
        self,
        root: PathLike,
        split: str,
        image_transform: Callable[[Image.Image], Any],
        text_transform: Optional[Callable[[str], Any]] = None,
        *,
        load_target_image: Optional[bool] = None,
        image_root: Optional[PathLike] = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.triplets, self.image_paths = _load(root, split, image_root)
        self.image_transform = image_transform
        self.text_transform = text_transform
        has_targets = split not in SPLITS_WITHOUT_TARGETS
        if load_target_image and not has_targets:
            raise ValueError(f"split {split!r} has no target images to load")
        self.load_target_image = has_targets if load_target_image is None else load_target_image
        self._captions_file = captions_file(root, split)

    def __len__(self) -> int:
        return len(self.triplets)

    def _image(self, name: str, pair_id: int, role: str) -> Any:
        referenced_by = f"{self._captions_file} pairid {pair_id} {role}"
        return self.image_transform(load_cirr_image(self.image_paths[name], referenced_by))

    def __getitem__(self, index: int) -> dict[str, Any]:
        triplet = self.triplets[index]
        caption = triplet.caption if self.text_transform is None else self.text_transform(triplet.caption)
        item: dict[str, Any] = {
            "reference_image": self._image(triplet.reference, triplet.pair_id, "reference"),
            "text_input": caption,
            "pair_id": triplet.pair_id,
            "reference_name": triplet.reference,
        }
        if triplet.target is not None:
            item["target_name"] = triplet.target
            if self.load_target_image:
                item["target_image"] = self._image(triplet.target, triplet.pair_id, "target_hard")
        return item


class CirrGalleryDataset(CollatedDataset):
    """Every image of a CIRR split, in ``image_splits`` file order: the retrieval gallery.

    Item: ``{"image": (3, H, W) tensor, "image_name": str}``.

    Args:
        root: dataset root.
        split: ``train``, ``val`` or ``test1``.
        image_transform: PIL RGB image -> tensor.
        image_root: see :func:`resolve_image_root`.
    """

    def __init__(
        self,
        root: PathLike,
        split: str,
        image_transform: Callable[[Image.Image], Any],
        *,
        image_root: Optional[PathLike] = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.image_paths = load_cirr_image_split(root, split, image_root=image_root)
        self.image_names = list(self.image_paths)
        self.image_transform = image_transform
        self._split_file = image_split_file(root, split)

    def __len__(self) -> int:
        return len(self.image_names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.image_names[index]
        image = load_cirr_image(self.image_paths[name], f"{self._split_file} image {name!r}")
        return {"image": self.image_transform(image), "image_name": name}
