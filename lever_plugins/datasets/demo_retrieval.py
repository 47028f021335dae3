"""A small synthetic image-text retrieval dataset in the Flickr30K/LAVIS file format, for demos and tests.

Every image shows two or three coloured shapes, each in a different part of the image (left, right,
top, bottom), on a light background; the colours in one image are distinct. Shapes and colours are
those of :mod:`lever_plugins.datasets.demo_cirr` (5 shapes x 6 colours), so every caption word is in
the shipped demo vocabulary (``lever_plugins/configs/demo_vocab.txt``).

Each image gets five different short captions, each naming two of its objects (sometimes with their
places), e.g. ``"a red circle and a blue square"``, ``"a green cross on the left and a red square"``,
``"a yellow triangle with a purple diamond at the top"``, and one *dense caption* describing every
object and where it is, e.g. ``"a red circle on the left, a blue square at the top and a green cross
at the bottom"``. A short caption leaves out an image's third object and may be true of other images;
the dense caption pins the image down, which is the situation SEPS's dense branch is for.

Layout written under ``root`` (what :mod:`lever_plugins.datasets.retrieval` reads with the
``lever_flickr30k`` defaults)::

    images/{train,val,test}/<name>.png
    annotations/train.json        [{"image": "train/<name>.png", "caption": str, "image_id": "<name>"}, ...]
    annotations/{val,test}.json   [{"image": "val/<name>.png", "caption": [5 captions]}, ...]
    dense_captions.json           {"train/<name>.png": "a red circle on the left, ...", ...}
    demo_retrieval.json           generation parameters (a second call with the same ones does nothing)
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Union

from PIL import Image

from lever_plugins.datasets.demo_cirr import COLOURS, SHAPES, draw_scene
from lever_plugins.datasets.demo_root import DemoRoot, check_sizes
from lever_plugins.io import write_json_atomic, write_png_atomic

POSITIONS = ("left", "top", "right", "bottom")  # also the order objects are listed in a dense caption
PLACE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
CAPTIONS_PER_IMAGE = 5
MARKER_NAME = "demo_retrieval.json"
_FORMAT_VERSION = 2
_OWNED = ("images", "annotations", "dense_captions.json")
SPLITS = ("train", "val", "test")

DemoObject = tuple[str, str, str]  # (shape, colour, position)
PathLike = Union[str, os.PathLike]


def random_objects(rng: random.Random) -> list[DemoObject]:
    """Two or three objects in distinct places with distinct colours, listed in :data:`POSITIONS` order."""
    count = rng.choice((2, 3))
    places = sorted(rng.sample(POSITIONS, count), key=POSITIONS.index)
    colours = rng.sample(list(COLOURS), count)
    return [(rng.choice(SHAPES), colour, place) for colour, place in zip(colours, places)]


def _name(obj: DemoObject) -> str:
    shape, colour, _ = obj
    return f"a {colour} {shape}"


def dense_caption(objects: list[DemoObject]) -> str:
    """Every object with its place: ``"a red circle on the left, a blue square at the top and ..."``."""
    parts = [f"{_name(obj)} {PLACE_PHRASES[obj[2]]}" for obj in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def short_caption(objects: list[DemoObject], rng: random.Random) -> str:
    """One short caption naming two of ``objects``, sometimes with places (templates in the module docstring)."""
    first, second = rng.sample(objects, 2)
    template = rng.choice(("pair", "pair_with", "first_placed", "second_placed", "both_placed"))
    if template == "pair":
        return f"{_name(first)} and {_name(second)}"
    if template == "pair_with":
        return f"{_name(first)} with {_name(second)}"
    if template == "first_placed":
        return f"{_name(first)} {PLACE_PHRASES[first[2]]} and {_name(second)}"
    if template == "second_placed":
        return f"{_name(first)} with {_name(second)} {PLACE_PHRASES[second[2]]}"
    return f"{_name(first)} {PLACE_PHRASES[first[2]]} and {_name(second)} {PLACE_PHRASES[second[2]]}"


def render_objects(objects: list[DemoObject], image_size: int, rng: random.Random, supersample: int = 4) -> Image.Image:
    """Draw the objects; ``rng`` supplies the jitter (centres, sizes, background shade)."""
    shapes = [(shape, colour, _CENTRES[place]) for shape, colour, place in objects]
    return draw_scene(shapes, image_size, rng, 0.03, (0.13, 0.16), supersample)


def _generate_split(root: Path, split: str, count: int, image_size: int, seed: int, dense: dict[str, str]) -> None:
    rng = random.Random(f"{seed}:{split}")
    annotations: list[dict[str, Any]] = []
    for index in range(count):
        objects = random_objects(rng)
        name = f"{split}-{index:05d}"
        relative = f"{split}/{name}.png"
        write_png_atomic(root / "images" / relative, render_objects(objects, image_size, random.Random(f"{seed}:{name}:render")))
        captions: list[str] = []
        while len(captions) < CAPTIONS_PER_IMAGE:  # five different captions (there are always more than five)
            caption = short_caption(objects, rng)
            if caption not in captions:
                captions.append(caption)
        dense[relative] = dense_caption(objects)
        if split == "train":
            annotations.extend({"image": relative, "caption": c, "image_id": name} for c in captions)
        else:
            annotations.append({"image": relative, "caption": captions})
    write_json_atomic(root / "annotations" / f"{split}.json", annotations, indent=1)


def generate_demo_retrieval(
    root: PathLike,
    *,
    num_train: int = 1000,
    num_val: int = 100,
    num_test: int = 100,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Render the demo dataset under ``root`` (see the module docstring); a no-op if already there.

    Args:
        root: output folder; created if missing. It must be empty, or hold a demo dataset (which is
            replaced when generated with other parameters).
        num_train, num_val, num_test: images per split (five captions each).
        image_size: side of the square PNGs in pixels.
        seed: everything follows from it; same seed, same bytes.

    Returns:
        ``root`` as a Path.

    Raises:
        FileExistsError: ``root`` holds other files and no demo marker (real data is never overwritten).
    """
    sizes = {"num_train": num_train, "num_val": num_val, "num_test": num_test, "image_size": image_size}
    check_sizes(sizes, least={"image_size": 8})
    params = {**sizes, "seed": int(seed)}
    expected_marker = {"generator": __name__, "format": _FORMAT_VERSION, "params": params, "complete": True}
    root = Path(root)
    demo = DemoRoot(root, MARKER_NAME, _OWNED, expected_marker, "retrieval")
    if not demo.begin():
        return root
    dense: dict[str, str] = {}
    for split, count in zip(SPLITS, (num_train, num_val, num_test)):
        _generate_split(root, split, count, image_size, int(seed), dense)
    write_json_atomic(root / "dense_captions.json", dense, indent=1)
    demo.finish()
    return root
