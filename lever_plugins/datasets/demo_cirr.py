"""A small synthetic dataset in the exact CIRR file format, for demos and tests.

Every image shows one coloured shape on a light plain background. An image is described by three
attributes:

* shape: ``circle``, ``square``, ``triangle``, ``diamond``, ``cross``
* colour: ``red``, ``green``, ``blue``, ``yellow``, ``purple``, ``orange``
* position: ``left``, ``right``, ``top``, ``bottom`` (the shape's centre sits in that part of the image)

5 x 6 x 4 = 120 attribute combinations. Each split renders its own images of every combination
(``train_renders`` per combination for train, one for val and test1), each with a little jitter in
centre, size and background shade, so splits share no image file (as in CIRR) yet a model that
learns the attributes on train can retrieve on val.

A triplet changes one or two attributes of its reference; the caption says which, and the target is
the image of the resulting combination. Caption grammar (``{s}``/``{c}``/``{p}``: the reference's
shape/colour/position, primed: the target's; ``a``/``an`` agree with the next word)::

    colour:           "make it {c'}" | "change the colour to {c'}" | "the same {s} but {c'}" | "paint the {s} {c'}"
    shape:            "change it to a {s'}" | "make it a {s'}" | "replace the {s} with a {s'}" | "turn the {c} {s} into a {s'}"
    position:         "move it to the {p'}" | "put the {s} at the {p'}" | "shift it to the {p'}"
    colour + shape:   "make it a {c'} {s'}" | "replace it with a {c'} {s'}"
    shape + position: "a {s'} on the {p'} instead"
    colour + position: "make it {c'} and move it to the {p'}"

Each entry's ``img_set.members`` holds six images like CIRR's: the reference, the target and four hard
distractors, each one attribute away from the target (a near miss that ignores part of the caption).

Layout written under ``root`` (what :mod:`lever_plugins.datasets.cirr` reads): ``captions/cap.rc2.
{train,val,test1}.json``, ``image_splits/split.rc2.{...}.json``, PNGs in ``train/<0-9>/``, ``dev/``,
``test1/``, plus ``vocab.txt`` (a BERT WordPiece vocabulary covering every caption, for a
``transformers.BertTokenizer(vocab_file=...)``) and ``demo_cirr.json`` (the generation parameters;
a second call with the same parameters does nothing).
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Sequence, Union

from PIL import Image, ImageDraw

from lever_plugins.datasets.demo_root import DemoRoot, check_sizes
from lever_plugins.io import write_bytes_atomic, write_json_atomic, write_png_atomic

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (236, 200, 30),
    "purple": (140, 70, 180),
    "orange": (245, 125, 20),
}
POSITIONS = ("left", "right", "top", "bottom")
# Centre of the shape as a fraction of (width, height).
_POSITION_CENTRES = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}

# Which attributes a modification changes -> caption templates. Weighted: single changes dominate.
TEMPLATES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("colour",): ("make it {c2}", "change the colour to {c2}", "the same {s} but {c2}", "paint the {s} {c2}"),
    ("shape",): (
        "change it to a {s2}",
        "make it a {s2}",
        "replace the {s} with a {s2}",
        "turn the {c} {s} into a {s2}",
    ),
    ("position",): ("move it to the {p2}", "put the {s} at the {p2}", "shift it to the {p2}"),
    ("colour", "shape"): ("make it a {c2} {s2}", "replace it with a {c2} {s2}"),
    ("shape", "position"): ("a {s2} on the {p2} instead",),
    ("colour", "position"): ("make it {c2} and move it to the {p2}",),
}
_CHANGE_WEIGHTS = {
    ("colour",): 0.25,
    ("shape",): 0.25,
    ("position",): 0.25,
    ("colour", "shape"): 0.1,
    ("shape", "position"): 0.075,
    ("colour", "position"): 0.075,
}
_SPECIAL_TOKENS = ("[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_PUNCTUATION = (".", ",", "!", "?", "'", "-")
_FORMAT_VERSION = 1
MARKER_NAME = "demo_cirr.json"
_OWNED = ("captions", "image_splits", "train", "dev", "test1", "vocab.txt")
# split -> (file-name prefix, image folder)
_SPLIT_LAYOUT = {"train": ("train", "train"), "val": ("dev", "dev"), "test1": ("test1", "test1")}

Combo = tuple[str, str, str]  # (shape, colour, position)
PathLike = Union[str, os.PathLike]


def all_combos() -> list[Combo]:
    """Every (shape, colour, position), in a fixed order."""
    return [(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]


def _article(text: str) -> str:
    # "a orange square" -> "an orange square"
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption_for(change: tuple[str, ...], reference: Combo, target: Combo, rng: random.Random) -> str:
    """One caption that turns ``reference`` into ``target`` (their differing attributes = ``change``)."""
    template = rng.choice(TEMPLATES[change])
    (s, c, p), (s2, c2, p2) = reference, target
    return _article(template.format(s=s, c=c, p=p, s2=s2, c2=c2, p2=p2))


def _apply_change(reference: Combo, change: tuple[str, ...], rng: random.Random) -> Combo:
    shape, colour, position = reference
    if "shape" in change:
        shape = rng.choice([s for s in SHAPES if s != shape])
    if "colour" in change:
        colour = rng.choice([c for c in COLOURS if c != colour])
    if "position" in change:
        position = rng.choice([p for p in POSITIONS if p != position])
    return (shape, colour, position)


def _near_misses(target: Combo) -> list[Combo]:
    """Combos exactly one attribute away from ``target``."""
    shape, colour, position = target
    return (
        [(s, colour, position) for s in SHAPES if s != shape]
        + [(shape, c, position) for c in COLOURS if c != colour]
        + [(shape, colour, p) for p in POSITIONS if p != position]
    )


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: Any) -> None:
    """Draw one of :data:`SHAPES` centred at ``(cx, cy)`` with radius ``r`` (pixels)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        half = r * 0.85
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        arm = r * 0.33
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def draw_scene(
    shapes: Sequence[tuple[str, str, tuple[float, float]]],
    image_size: int,
    rng: random.Random,
    jitter: float,
    radius: tuple[float, float],
    supersample: int = 4,
) -> Image.Image:
    """``(shape, colour, (fx, fy))`` shapes on a light grey square, drawn ``supersample`` times larger and
    box-downsampled. ``rng`` supplies the background shade, then per shape its centre (``fx, fy`` as
    fractions of the side, moved by up to ``jitter``) and its radius (a fraction in ``radius``)."""
    big = image_size * supersample
    shade = rng.randint(225, 250)
    image = Image.new("RGB", (big, big), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for shape, colour, (fx, fy) in shapes:
        cx = (fx + rng.uniform(-jitter, jitter)) * big
        cy = (fy + rng.uniform(-jitter, jitter)) * big
        r = rng.uniform(*radius) * big
        draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def render_image(combo: Combo, image_size: int, rng: random.Random, supersample: int = 4) -> Image.Image:
    """Draw one shape; ``rng`` supplies the jitter (centre, size, background shade)."""
    shape, colour, position = combo
    return draw_scene([(shape, colour, _POSITION_CENTRES[position])], image_size, rng, 0.04, (0.15, 0.19), supersample)


def _write_json(path: Path, payload: Any) -> None:
    write_json_atomic(path, payload, indent=1)


def _image_name(split: str, combo: Combo, render: int) -> str:
    prefix = _SPLIT_LAYOUT[split][0]
    return f"{prefix}-{'-'.join(combo)}-{render}"


def _relative_path(split: str, combo_index: int, name: str) -> str:
    folder = _SPLIT_LAYOUT[split][1]
    if split == "train":  # CIRR's train images sit in numbered sub-folders (inherited from NLVR2)
        return f"./{folder}/{combo_index % 10}/{name}.png"
    return f"./{folder}/{name}.png"


def _render_split(root: Path, split: str, renders: int, image_size: int, seed: int) -> dict[Combo, list[str]]:
    """Render every combo ``renders`` times; write PNGs and the image_splits file."""
    names: dict[Combo, list[str]] = {}
    relpaths: dict[str, str] = {}
    for combo_index, combo in enumerate(all_combos()):
        names[combo] = []
        for render in range(renders):
            name = _image_name(split, combo, render)
            image = render_image(combo, image_size, random.Random(f"{seed}:{name}"))
            relative = _relative_path(split, combo_index, name)
            write_png_atomic(root / relative, image)
            relpaths[name] = relative
            names[combo].append(name)
    _write_json(root / "image_splits" / f"split.rc2.{split}.json", relpaths)
    return names


def _make_triplets(
    split: str, count: int, names: dict[Combo, list[str]], seed: int, first_pair_id: int
) -> list[dict[str, Any]]:
    rng = random.Random(f"{seed}:{split}:triplets")
    combos = all_combos()
    changes = list(_CHANGE_WEIGHTS)
    weights = [_CHANGE_WEIGHTS[c] for c in changes]
    entries = []
    for index in range(count):
        reference = rng.choice(combos)
        change = rng.choices(changes, weights)[0]
        target = _apply_change(reference, change, rng)
        caption = caption_for(change, reference, target, rng)
        distractors = rng.sample([c for c in _near_misses(target) if c != reference], 4)
        reference_name = rng.choice(names[reference])
        target_name = rng.choice(names[target])
        members = [reference_name, target_name] + [rng.choice(names[c]) for c in distractors]
        rng.shuffle(members)
        entry: dict[str, Any] = {"pairid": first_pair_id + index, "reference": reference_name}
        if split != "test1":
            entry["target_hard"] = target_name
            entry["target_soft"] = {target_name: 1.0}
        entry["caption"] = caption
        entry["img_set"] = {
            "id": index,
            "members": members,
            "reference_rank": members.index(reference_name),
            "target_rank": members.index(target_name),
        }
        entries.append(entry)
    return entries


def caption_words() -> list[str]:
    """Every word any demo caption can contain, sorted."""
    words = set()
    for templates in TEMPLATES.values():
        for template in templates:
            words.update(w for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", template)))
    words.update(SHAPES, COLOURS, POSITIONS, {"a", "an"})
    return sorted(words)


def write_vocab(path: PathLike) -> Path:
    """Write a BERT WordPiece vocab covering every demo caption (and any lowercase word, letter by letter).

    Order: ``[PAD]`` (id 0), ``[unused0]``, ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``, punctuation,
    single letters and their ``##`` continuations, then whole caption words.
    """
    letters = [chr(o) for o in range(ord("a"), ord("z") + 1)]
    tokens = list(_SPECIAL_TOKENS) + list(_PUNCTUATION) + letters + [f"##{ch}" for ch in letters]
    tokens += [w for w in caption_words() if w not in tokens]
    out = Path(path)
    write_bytes_atomic(out, ("\n".join(tokens) + "\n").encode("utf-8"))
    return out


def generate_demo_cirr(
    root: PathLike,
    *,
    num_train: int = 2000,
    num_val: int = 300,
    num_test: int = 300,
    image_size: int = 64,
    seed: int = 0,
    train_renders: int = 2,
) -> Path:
    """Render the demo dataset under ``root`` (see the module docstring); a no-op if already there.

    Args:
        root: output folder; created if missing. It must be empty, or hold a demo dataset (which is
            replaced when generated with other parameters).
        num_train, num_val, num_test: triplets per split (train, val, test1).
        image_size: side of the square PNGs in pixels.
        seed: everything (jitter, triplets, captions) follows from it; same seed, same bytes.
        train_renders: images per attribute combination in train (val and test1 have one).

    Returns:
        ``root`` as a Path.

    Raises:
        FileExistsError: ``root`` holds other files and no demo marker (never overwrite real data).
    """
    sizes = {"num_train": num_train, "num_val": num_val, "num_test": num_test, "image_size": image_size,
             "train_renders": train_renders}
    check_sizes(sizes, least={"image_size": 8})
    params = {**sizes, "seed": int(seed)}
    expected_marker = {"generator": __name__, "format": _FORMAT_VERSION, "params": params, "complete": True}
    root = Path(root)
    demo = DemoRoot(root, MARKER_NAME, _OWNED, expected_marker, "CIRR")
    if not demo.begin():
        return root

    first_pair_id = {"train": 0, "val": num_train, "test1": num_train + num_val}
    counts = {"train": num_train, "val": num_val, "test1": num_test}
    for split in ("train", "val", "test1"):
        renders = train_renders if split == "train" else 1
        names = _render_split(root, split, renders, image_size, int(seed))
        entries = _make_triplets(split, counts[split], names, int(seed), first_pair_id[split])
        _write_json(root / "captions" / f"cap.rc2.{split}.json", entries)
    write_vocab(root / "vocab.txt")
    demo.finish()
    return root
