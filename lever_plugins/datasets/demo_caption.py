"""A COCO-caption mini dataset (Karpathy ``dataset_coco.json`` + PNG images) for ICD selection on captions.

**The images.** Each shows one shape (circle, square, triangle, cross) in one of six colours, at a
random place and size on one of four pale background tints: 24 contents, the place, size and tint
being noise that a pixel-level similarity picks up as readily as the content.

**The captions.** Five per image, one of each template, in a random order::

    "A red circle."                "A picture of a red circle."       "There is a red circle in the image."
    "A red circle on a plain background."                             "The circle is red."

Demonstrations show an image's first sentence; CIDEr compares with all five.

**The tiny model.** :func:`train_caption_lm` trains the demo's 2-layer word-level Llama (as
:mod:`~lever_plugins.datasets.demo_vqa`) on random demonstration lists: 1-3 captions of random
contents, then ``Caption:`` and the caption of a content taken from one of the demonstrations shown
(uniformly), in a random template. The model never sees an image: it can only describe a query by
copying the content of its demonstrations, and copies a content the more often it is shown. Zero-shot
it can only guess; with a demonstration of the query's content it describes it. Which of the pool's
images share the query's content is what beam search finds (by the caption's likelihood) and the
selector must learn from image features.

Layout written under ``root`` (the Karpathy format, what :mod:`lever_plugins.icl.caption_data` reads)::

    dataset_coco.json                  600 train + 200 restval (supporting set), 20 val, 200 test images
    train2014/COCO_train2014_<cocoid:012d>.png, val2014/COCO_val2014_<cocoid:012d>.png
    tiny_lm/                           config.json, model.safetensors, tokenizer files (AutoModelForCausalLM)
    demo_caption.json                  generation parameters; a second call with the same ones does nothing
"""
from __future__ import annotations

import io
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Union

from PIL import Image, ImageDraw

from lever_plugins.datasets.demo_cirr import COLOURS, draw_shape
from lever_plugins.datasets.demo_root import DemoRoot
from lever_plugins.io import write_bytes_atomic, write_json_atomic

SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = ((236, 236, 236), (214, 228, 244), (244, 236, 206), (240, 214, 224))
TEMPLATES = (
    "A {c} {s}.",
    "A picture of a {c} {s}.",
    "There is a {c} {s} in the image.",
    "A {c} {s} on a plain background.",
    "The {s} is {c}.",
)
# The prompt of the demo recipe (run.vlm): the tiny LM is trained on exactly this format.
ICD_TEMPLATE = "Caption: {caption}"
QUERY_TEMPLATE = "Caption:"
SEPARATOR = "\n"
# (Karpathy split, image folder, count); cocoids are numbered from 1 in this order.
SPLITS = (("train", "train2014", 600), ("restval", "val2014", 200), ("val", "val2014", 20), ("test", "val2014", 200))
IMAGE_SIZE = 32
KARPATHY_FILE = "dataset_coco.json"
MARKER = "demo_caption.json"
LM_DIR = "tiny_lm"
_OWNED = (KARPATHY_FILE, "train2014", "val2014", LM_DIR)
_FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


def caption(content: tuple[str, str], template: int) -> str:
    """The caption of ``(colour, shape)`` in template ``template``."""
    colour, shape = content
    return TEMPLATES[template].format(c=colour, s=shape)


def caption_words() -> list[str]:
    """Every token of the demo prompts and captions (word-level: punctuation apart)."""
    text = " ".join([*TEMPLATES, ICD_TEMPLATE, QUERY_TEMPLATE])
    words = set(re.findall(r"[A-Za-z]+|[^\sA-Za-z{}]", re.sub(r"\{\w+\}", " ", text)))
    return sorted(words | set(COLOURS) | set(SHAPES))


def demo_paths(root: PathLike) -> dict[str, str]:
    root = os.fspath(root)
    return {"karpathy_json": os.path.join(root, KARPATHY_FILE), "images": root, "lm": os.path.join(root, LM_DIR)}


def render(content: tuple[str, str], rng: random.Random, supersample: int = 4) -> Image.Image:
    """One ``IMAGE_SIZE`` PNG-ready image of ``(colour, shape)``; ``rng`` draws tint, place and size."""
    colour, shape = content
    big = IMAGE_SIZE * supersample
    image = Image.new("RGB", (big, big), rng.choice(BACKGROUNDS))
    radius = rng.uniform(0.16, 0.26) * big
    cx, cy = (rng.uniform(radius, big - radius) for _ in range(2))
    draw_shape(ImageDraw.Draw(image), shape, cx, cy, radius, COLOURS[colour])
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def _karpathy_entries(root: Path, seed: int) -> list[dict]:
    """Render every image and return the ``images`` list of ``dataset_coco.json``."""
    rng = random.Random(f"caption-data:{seed}")
    contents = [(c, s) for c in COLOURS for s in SHAPES]
    entries, cocoid, sentid = [], 0, 0
    for split, folder, count in SPLITS:
        for _ in range(count):
            cocoid += 1
            content = rng.choice(contents)
            filename = f"COCO_{folder}_{cocoid:012d}.png"
            buffer = io.BytesIO()
            render(content, rng).save(buffer, format="PNG")
            write_bytes_atomic(root / folder / filename, buffer.getvalue())
            order = rng.sample(range(len(TEMPLATES)), len(TEMPLATES))
            sentences = []
            for template in order:
                raw = caption(content, template)
                tokens = re.findall(r"[a-z]+", raw.lower())
                sentences.append({"tokens": tokens, "raw": raw, "imgid": len(entries), "sentid": sentid})
                sentid += 1
            entries.append({
                "filepath": folder, "sentids": [s["sentid"] for s in sentences], "filename": filename,
                "imgid": len(entries), "split": split, "sentences": sentences, "cocoid": cocoid,
            })
    return entries


def _lm_sequence(tokenizer, rng: random.Random) -> tuple[list[int], list[int]]:
    """A random training list in the demo prompt format; returns (ids, positions of the caption + separator)."""
    contents = [(c, s) for c in COLOURS for s in SHAPES]
    shown = [rng.choice(contents) for _ in range(rng.randint(1, 3))]
    demos = [ICD_TEMPLATE.format(caption=caption(content, rng.randrange(len(TEMPLATES)))) for content in shown]
    prompt_ids = tokenizer(SEPARATOR.join([*demos, QUERY_TEMPLATE]))["input_ids"]
    target = caption(rng.choice(shown), rng.randrange(len(TEMPLATES)))
    target_ids = tokenizer(" " + target + SEPARATOR, add_special_tokens=False)["input_ids"]
    return prompt_ids + target_ids, list(range(len(prompt_ids), len(prompt_ids) + len(target_ids)))


def train_caption_lm(out_dir: str, steps: int = 400, seed: int = 0) -> dict:
    """Train the tiny caption copier (see the module docstring) into ``out_dir``; returns its stats."""
    from lever_plugins.datasets.demo_vqa import train_demo_lm

    return train_demo_lm(out_dir, steps=steps, seed=seed, words=caption_words(), sequence=_lm_sequence)


def generate_demo_caption(root: PathLike, *, lm_steps: int = 400, seed: int = 0) -> dict[str, str]:
    """Write the demo (images, ``dataset_coco.json``, tiny LM) under ``root``; a no-op if already there.

    Returns:
        The paths of :func:`demo_paths`.

    Raises:
        FileExistsError: ``root`` holds other files and no demo marker (real data is never written over).
    """
    params = {"splits": [list(s) for s in SPLITS], "image_size": IMAGE_SIZE, "lm_steps": lm_steps, "seed": int(seed)}
    expected = {"generator": __name__, "format": _FORMAT_VERSION, "params": params}
    root_path = Path(root)
    demo = DemoRoot(root_path, MARKER, _OWNED, expected, "caption")
    paths = demo_paths(root_path)
    if not demo.begin():
        return paths
    write_json_atomic(root_path / KARPATHY_FILE, {"images": _karpathy_entries(root_path, int(seed)), "dataset": "coco"})
    staging = tempfile.mkdtemp(prefix=".tiny_lm-", dir=root_path)
    try:
        train_caption_lm(staging, steps=lm_steps, seed=int(seed))
        os.replace(staging, paths["lm"])
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    demo.finish()
    return paths
