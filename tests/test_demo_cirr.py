"""The embedded demo CIRR dataset: real format, deterministic, idempotent, solvable, tokenizable."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from lever_plugins.datasets.cirr import (
    CirrGalleryDataset,
    CirrTripletDataset,
    load_cirr_image_split,
    load_cirr_triplets,
)
from lever_plugins.datasets.demo_cirr import COLOURS, MARKER_NAME, POSITIONS, SHAPES, generate_demo_cirr
from lever_plugins.datasets.transforms import cir_image_transform

SMALL = dict(num_train=80, num_val=30, num_test=20, image_size=32, seed=3)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return generate_demo_cirr(tmp_path_factory.mktemp("demo") / "cirr", **SMALL)


def _attributes(name: str) -> tuple[str, str, str]:
    # <prefix>-<shape>-<colour>-<position>-<render>
    _, shape, colour, position, _ = name.split("-")
    return shape, colour, position


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_loads_through_the_cirr_loader(demo_root: Path):
    counts = {split: len(load_cirr_triplets(demo_root, split)) for split in ("train", "val", "test1")}
    assert counts == {"train": 80, "val": 30, "test1": 20}
    dataset = CirrTripletDataset(demo_root, "val", cir_image_transform(image_size=32))
    item = dataset[0]
    assert item["reference_image"].shape == (3, 32, 32) and isinstance(item["text_input"], str)
    gallery = CirrGalleryDataset(demo_root, "val", cir_image_transform(image_size=32))
    assert len(gallery) == len(SHAPES) * len(COLOURS) * len(POSITIONS)
    assert gallery[5]["image"].shape == (3, 32, 32)
    train_gallery = CirrGalleryDataset(demo_root, "train", cir_image_transform(image_size=32))
    assert len(train_gallery) == 2 * len(gallery)  # two renders per combination by default


def test_galleries_hold_every_target_and_member_and_splits_share_no_image(demo_root: Path):
    names = {}
    for split in ("train", "val", "test1"):
        names[split] = set(json.loads((demo_root / "image_splits" / f"split.rc2.{split}.json").read_text()))
        for entry in json.loads((demo_root / "captions" / f"cap.rc2.{split}.json").read_text()):
            members = entry["img_set"]["members"]
            assert len(members) == 6 == len(set(members))
            assert set(members) <= names[split] and entry["reference"] in members
            if split != "test1":
                assert entry["target_hard"] in members
                assert members[entry["img_set"]["target_rank"]] == entry["target_hard"]
            else:
                assert "target_hard" not in entry and "target_soft" not in entry
    assert not (names["train"] & names["val"]) and not (names["val"] & names["test1"])


def test_caption_and_reference_determine_the_target(demo_root: Path):
    vocabulary = {"shape": SHAPES, "colour": tuple(COLOURS), "position": POSITIONS}
    for split in ("train", "val"):
        for triplet in load_cirr_triplets(demo_root, split):
            reference = dict(zip(vocabulary, _attributes(triplet.reference)))
            target = dict(zip(vocabulary, _attributes(triplet.target)))
            words = set(re.findall(r"[a-z]+", triplet.caption))
            changed = [k for k in vocabulary if reference[k] != target[k]]
            assert 1 <= len(changed) <= 2, triplet
            for kind, values in vocabulary.items():
                mentioned = words & set(values)
                # Only the reference's or the target's value of an attribute is ever named ...
                assert mentioned <= {reference[kind], target[kind]}, triplet
                # ... and every change names its new value.
                if kind in changed:
                    assert target[kind] in mentioned, triplet
            # Hard distractors: one attribute away from the target.
            for member in triplet.group_members:
                if member not in (triplet.reference, triplet.target):
                    diff = sum(a != b for a, b in zip(_attributes(member), _attributes(triplet.target)))
                    assert diff == 1, (triplet, member)


def test_generation_is_deterministic(tmp_path: Path, demo_root: Path):
    again = generate_demo_cirr(tmp_path / "again", **SMALL)
    first, second = _files(demo_root), _files(again)
    assert first.keys() == second.keys()
    assert first == second  # byte-identical captions, splits, PNGs, vocab and marker
    other = generate_demo_cirr(tmp_path / "other", **{**SMALL, "seed": 4})
    assert (other / "captions" / "cap.rc2.train.json").read_bytes() != first["captions/cap.rc2.train.json"]


def test_second_call_is_a_no_op(demo_root: Path):
    probe = demo_root / "captions" / "cap.rc2.val.json"
    before = probe.stat().st_mtime_ns
    start = time.perf_counter()
    assert generate_demo_cirr(demo_root, **SMALL) == demo_root
    assert time.perf_counter() - start < 0.5
    assert probe.stat().st_mtime_ns == before


def test_other_parameters_regenerate(tmp_path: Path):
    root = generate_demo_cirr(tmp_path / "cirr", **SMALL)
    generate_demo_cirr(root, **{**SMALL, "num_val": 12, "train_renders": 1})
    assert len(load_cirr_triplets(root, "val")) == 12
    train_images = json.loads((root / "image_splits" / "split.rc2.train.json").read_text())
    assert len(train_images) == 120
    assert len(list((root / "train").rglob("*.png"))) == 120  # the old second renders are gone
    assert json.loads((root / MARKER_NAME).read_text())["params"]["num_val"] == 12


def test_interrupted_generation_is_redone(tmp_path: Path):
    root = generate_demo_cirr(tmp_path / "cirr", **SMALL)
    marker = json.loads((root / MARKER_NAME).read_text())
    (root / MARKER_NAME).write_text(json.dumps({**marker, "complete": False}))
    (root / "captions" / "cap.rc2.val.json").write_text("[")  # half-written by the killed run
    generate_demo_cirr(root, **SMALL)
    assert len(load_cirr_triplets(root, "val")) == SMALL["num_val"]


def test_refuses_to_write_over_other_data(tmp_path: Path):
    root = tmp_path / "real_cirr"
    (root / "captions").mkdir(parents=True)
    (root / "captions" / "cap.rc2.train.json").write_text("[]")
    with pytest.raises(FileExistsError, match="refusing"):
        generate_demo_cirr(root, **SMALL)
    assert (root / "captions" / "cap.rc2.train.json").read_text() == "[]"


@pytest.mark.parametrize("bad", [dict(num_train=0), dict(image_size=4), dict(train_renders=1.5)])
def test_bad_parameters(tmp_path: Path, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        generate_demo_cirr(tmp_path / "cirr", **{**SMALL, **bad})


def test_vocab_tokenizes_every_caption_without_unk(demo_root: Path):
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab_file=str(demo_root / "vocab.txt"))
    assert tokenizer.convert_tokens_to_ids("[PAD]") == 0 == tokenizer.pad_token_id
    for split in ("train", "val", "test1"):
        for triplet in load_cirr_triplets(demo_root, split):
            tokens = tokenizer.tokenize(triplet.caption)
            assert tokens == triplet.caption.split(), triplet.caption  # each word is one whole token
            ids = tokenizer(triplet.caption)["input_ids"]
            assert tokenizer.unk_token_id not in ids
    # Unseen lowercase words fall back to letters rather than [UNK].
    assert tokenizer.unk_token_id not in tokenizer("make it magenta!")["input_ids"]


def test_default_size_generates_quickly(tmp_path: Path):
    start = time.perf_counter()
    root = generate_demo_cirr(tmp_path / "cirr")
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0
    assert len(load_cirr_triplets(root, "train")) == 2000
    assert len(load_cirr_triplets(root, "val")) == 300
    assert os.path.getsize(root / "vocab.txt") > 0


def test_pixels_show_the_named_attributes(demo_root: Path):
    # A hand-written reader recovers colour, position and (for the distinctive fill ratios) shape from
    # the raw pixels of every val image: the names are true to the images, so the task is learnable.
    import numpy as np
    from PIL import Image

    palette = np.array(list(COLOURS.values()), dtype=float)
    paths = load_cirr_image_split(demo_root, "val")
    for name, path in paths.items():
        shape, colour, position = _attributes(name)
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
        foreground = pixels.max(-1) - pixels.min(-1) > 60  # the background is grey
        assert foreground.sum() > 20, name
        mean_colour = pixels[foreground].mean(0)
        assert list(COLOURS)[np.abs(palette - mean_colour).sum(1).argmin()] == colour, name
        rows, cols = np.nonzero(foreground)
        cy, cx = rows.mean() / pixels.shape[0] - 0.5, cols.mean() / pixels.shape[1] - 0.5
        seen = ("left" if cx < 0 else "right") if abs(cx) > abs(cy) else ("top" if cy < 0 else "bottom")
        assert seen == position, name
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        fill = foreground.sum() / box
        if shape == "square":
            assert fill > 0.95, name
        elif shape == "circle":
            assert 0.7 < fill < 0.9, name
        else:
            assert fill < 0.7, name


@pytest.mark.slow
def test_tiny_model_learns_the_demo_task(tmp_path: Path):
    """A 100k-parameter CNN + GRU composer trained 5 epochs on train retrieves val targets far above chance.

    Chance on the 120-image val gallery is R@1 ~0.8 %, Rs@1 20 %; this also runs the metric end to end.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    from lever_plugins.metrics.cir import cirr_metrics

    root = generate_demo_cirr(tmp_path / "cirr", image_size=32)
    transform = cir_image_transform(image_size=32)
    words = (root / "vocab.txt").read_text().split("\n")
    word_id = {w: i for i, w in enumerate(words)}

    def images(split):
        gallery = CirrGalleryDataset(root, split, transform)
        return {n: i for i, n in enumerate(gallery.image_names)}, torch.stack(
            [gallery[i]["image"] for i in range(len(gallery))]
        ), gallery.image_names

    def token_ids(captions):
        ids = [[word_id[w] for w in c.split()] for c in captions]
        width = max(map(len, ids))
        return torch.tensor([row + [0] * (width - len(row)) for row in ids])

    class Composer(nn.Module):
        def __init__(self):
            super().__init__()
            self.image = nn.Sequential(
                nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 128),
            )
            self.embed = nn.Embedding(len(words), 64, padding_idx=0)
            self.gru = nn.GRU(64, 64, batch_first=True)
            self.fuse = nn.Sequential(nn.Linear(192, 256), nn.ReLU(), nn.Linear(256, 128))

        def query(self, reference, ids):
            states, _ = self.gru(self.embed(ids))
            last = states[torch.arange(len(ids)), (ids != 0).sum(1) - 1]
            return F.normalize(self.fuse(torch.cat([self.image(reference), last], 1)), dim=-1)

        def target(self, image):
            return F.normalize(self.image(image), dim=-1)

    train_index, train_images, _ = images("train")
    val_index, val_images, val_names = images("val")
    train, val = load_cirr_triplets(root, "train"), load_cirr_triplets(root, "val")
    references = torch.tensor([train_index[t.reference] for t in train])
    targets = torch.tensor([train_index[t.target] for t in train])
    model = Composer()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: more threads only contend on a 2-core runner
    try:
        for _ in range(5):
            order = torch.randperm(len(train))
            for start in range(0, len(train), 64):
                batch = order[start : start + 64]
                query = model.query(train_images[references[batch]], token_ids([train[i].caption for i in batch]))
                key = model.target(train_images[targets[batch]])
                logits = query @ key.T / 0.07
                duplicate = (targets[batch][:, None] == targets[batch][None]) & ~torch.eye(len(batch), dtype=torch.bool)
                loss = F.cross_entropy(logits.masked_fill(duplicate, -1e4), torch.arange(len(batch)))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            query = model.query(
                val_images[[val_index[t.reference] for t in val]], token_ids([t.caption for t in val])
            )
            sims = query @ model.target(val_images).T
    finally:
        torch.set_num_threads(threads)
    metrics = cirr_metrics(
        sims, [t.reference for t in val], [t.target for t in val], val_names, [t.group_members for t in val]
    )
    assert metrics["recall_at1"] > 30.0, metrics
    assert metrics["recall_subset_at1"] > 50.0, metrics
