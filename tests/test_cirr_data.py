"""CIRR loading, validation errors and the target-pad transform, on small hand-written CIRR files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lever_plugins.datasets.cirr import (
    CirrDataError,
    CirrGalleryDataset,
    CirrTripletDataset,
    load_cirr_image_split,
    load_cirr_triplets,
)
from lever_plugins.datasets.transforms import CLIP_MEAN, CLIP_STD, TargetPad, cir_image_transform

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (90, 90, 90)]


def _image_names(split: str) -> list[str]:
    prefix = {"train": "train", "val": "dev", "test1": "test1"}[split]
    return [f"{prefix}-{i}-0-img0" for i in range(7)]


def _relative(split: str, name: str) -> str:
    if split == "train":
        return f"./train/{int(name.split('-')[1]) % 3}/{name}.png"
    return f"./{'dev' if split == 'val' else 'test1'}/{name}.png"


def _entries(split: str) -> list[dict]:
    names = _image_names(split)
    entries = []
    for k in range(3):
        members = names[k : k + 6]
        entry = {"pairid": 100 * k + len(split), "reference": members[0], "caption": f"caption {k}"}
        if split != "test1":
            entry["target_hard"] = members[1]
            entry["target_soft"] = {members[1]: 1.0}
        entry["img_set"] = {"id": k, "members": members, "reference_rank": 0, "target_rank": 1}
        entries.append(entry)
    return entries


def write_cirr(root: Path, image_root: Path | None = None) -> Path:
    """Tiny CIRR: 7 images of distinct colours (and sizes) per split, 3 triplets each."""
    image_root = image_root or root
    for split in ("train", "val", "test1"):
        split_map = {}
        for i, name in enumerate(_image_names(split)):
            relative = _relative(split, name)
            path = image_root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40 + 10 * i, 30), COLOURS[i]).save(path)
            split_map[name] = relative
        (root / "image_splits").mkdir(parents=True, exist_ok=True)
        (root / "image_splits" / f"split.rc2.{split}.json").write_text(json.dumps(split_map))
        (root / "captions").mkdir(parents=True, exist_ok=True)
        (root / "captions" / f"cap.rc2.{split}.json").write_text(json.dumps(_entries(split)))
    return root


@pytest.fixture()
def cirr_root(tmp_path: Path) -> Path:
    return write_cirr(tmp_path / "cirr")


def _rewrite_entries(root: Path, split: str, edit) -> Path:
    path = root / "captions" / f"cap.rc2.{split}.json"
    entries = json.loads(path.read_text())
    edit(entries)
    path.write_text(json.dumps(entries))
    return path


TRANSFORM = cir_image_transform(image_size=32)


# ---------------------------------------------------------------------------------------------- loading


def test_triplets_and_image_split(cirr_root: Path):
    triplets = load_cirr_triplets(cirr_root, "val")
    assert [t.pair_id for t in triplets] == [3, 103, 203]
    assert triplets[1].reference == "dev-1-0-img0" and triplets[1].target == "dev-2-0-img0"
    assert triplets[1].caption == "caption 1"
    assert triplets[1].group_members == tuple(f"dev-{i}-0-img0" for i in range(1, 7))
    assert all(t.target is None for t in load_cirr_triplets(cirr_root, "test1"))
    paths = load_cirr_image_split(cirr_root, "train")
    assert paths["train-4-0-img0"] == (cirr_root / "train" / "1" / "train-4-0-img0.png").absolute()
    assert all(p.is_absolute() and p.exists() for p in paths.values())


def test_triplet_dataset_items_and_batches(cirr_root: Path):
    dataset = CirrTripletDataset(cirr_root, "train", TRANSFORM, text_transform=str.upper)
    item = dataset[2]
    assert item["reference_image"].shape == (3, 32, 32)
    assert item["target_image"].shape == (3, 32, 32)
    assert item["text_input"] == "CAPTION 2"
    assert item["pair_id"] == 205
    assert (item["reference_name"], item["target_name"]) == ("train-2-0-img0", "train-3-0-img0")
    # The images are the right files: centre pixel colour survives the transform.
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    expected = (torch.tensor(COLOURS[3]) / 255.0 - mean) / std
    assert torch.allclose(item["target_image"][:, 16, 16], expected, atol=1e-2)
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=dataset.collater)))
    assert batch["reference_image"].shape == (3, 3, 32, 32)
    assert batch["pair_id"].tolist() == [5, 105, 205]
    assert batch["text_input"] == ["CAPTION 0", "CAPTION 1", "CAPTION 2"]


def test_test1_items_have_no_target_and_val_can_skip_target_image(cirr_root: Path):
    item = CirrTripletDataset(cirr_root, "test1", TRANSFORM)[0]
    assert "target_image" not in item and "target_name" not in item
    item = CirrTripletDataset(cirr_root, "val", TRANSFORM, load_target_image=False)[0]
    assert "target_image" not in item and item["target_name"] == "dev-1-0-img0"
    with pytest.raises(ValueError, match="no target images"):
        CirrTripletDataset(cirr_root, "test1", TRANSFORM, load_target_image=True)


def test_gallery_dataset(cirr_root: Path):
    gallery = CirrGalleryDataset(cirr_root, "val", TRANSFORM)
    assert len(gallery) == 7 and gallery.image_names == _image_names("val")
    item = gallery[4]
    assert item["image_name"] == "dev-4-0-img0" and item["image"].shape == (3, 32, 32)


def test_official_img_raw_layout(tmp_path: Path):
    root = tmp_path / "cirr"
    write_cirr(root, image_root=root / "img_raw")
    paths = load_cirr_image_split(root, "val")
    assert paths["dev-0-0-img0"] == (root / "img_raw" / "dev" / "dev-0-0-img0.png").absolute()
    assert CirrGalleryDataset(root, "val", TRANSFORM)[0]["image"].shape == (3, 32, 32)


def test_unknown_split_is_rejected(cirr_root: Path):
    with pytest.raises(ValueError, match="expected one of train, val, test1"):
        load_cirr_triplets(cirr_root, "test")


# ----------------------------------------------------------------------------------------------- errors


def _drop(key):
    def edit(entries):
        del entries[1][key]

    return edit


def _set(key, value):
    def edit(entries):
        entries[1][key] = value

    return edit


def _set_member(value):
    def edit(entries):
        entries[1]["img_set"]["members"][3] = value

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop("target_hard"), "missing 'target_hard'"),
        (_drop("caption"), "missing 'caption'"),
        (_drop("img_set"), "missing 'img_set'"),
        (_set("reference", "dev-99-0-img0"), "reference 'dev-99-0-img0' is not listed in"),
        (_set("target_hard", "nowhere"), "target_hard 'nowhere' is not listed in"),
        (_set_member("ghost"), "img_set.members 'ghost' is not listed in"),
        (_set("target_hard", "dev-0-0-img0"), "target_hard 'dev-0-0-img0' is not among img_set.members"),
        (_set("caption", 7), "'caption' must be a string"),
    ],
)
def test_bad_entry_names_file_pairid_and_expectation(cirr_root: Path, edit, message: str):
    path = _rewrite_entries(cirr_root, "val", edit)
    with pytest.raises(CirrDataError) as info:
        load_cirr_triplets(cirr_root, "val")
    text = str(info.value)
    assert str(path) in text and "pairid 103" in text and message in text
    assert "\n" not in text
    with pytest.raises(CirrDataError):  # the dataset validates on construction too
        CirrTripletDataset(cirr_root, "val", TRANSFORM)


def test_bad_pairid_and_repeated_pairid(cirr_root: Path):
    _rewrite_entries(cirr_root, "train", _set("pairid", "7"))
    with pytest.raises(CirrDataError, match=r"entry 1 \(pairid 7\): 'pairid' must be an integer"):
        load_cirr_triplets(cirr_root, "train")

    def repeat(entries):
        entries[2]["pairid"] = entries[0]["pairid"]

    _rewrite_entries(cirr_root, "val", repeat)
    with pytest.raises(CirrDataError, match=r"entry 2 \(pairid 3\): pairid repeats entry 0"):
        load_cirr_triplets(cirr_root, "val")


def test_test1_needs_no_target(cirr_root: Path):
    assert "target_hard" not in json.loads((cirr_root / "captions" / "cap.rc2.test1.json").read_text())[0]
    assert len(load_cirr_triplets(cirr_root, "test1")) == 3


@pytest.mark.parametrize("which", ["captions/cap.rc2.val.json", "image_splits/split.rc2.val.json"])
def test_bad_json_names_the_file(cirr_root: Path, which: str):
    (cirr_root / which).write_text('[{"pairid": 1,')
    with pytest.raises(CirrDataError, match="not valid JSON") as info:
        load_cirr_triplets(cirr_root, "val")
    assert str(cirr_root / which) in str(info.value)


def test_missing_captions_file(cirr_root: Path):
    (cirr_root / "captions" / "cap.rc2.train.json").unlink()
    with pytest.raises(CirrDataError, match="cap.rc2.train.json: file not found"):
        load_cirr_triplets(cirr_root, "train")


def test_wrong_top_level_types(cirr_root: Path):
    (cirr_root / "captions" / "cap.rc2.val.json").write_text('{"pairid": 1}')
    with pytest.raises(CirrDataError, match="expected a JSON list"):
        load_cirr_triplets(cirr_root, "val")
    (cirr_root / "image_splits" / "split.rc2.train.json").write_text("[]")
    with pytest.raises(CirrDataError, match="expected a JSON object image name"):
        load_cirr_image_split(cirr_root, "train")


def test_missing_image_names_file_and_entry(cirr_root: Path):
    (cirr_root / "dev" / "dev-2-0-img0.png").unlink()
    dataset = CirrTripletDataset(cirr_root, "val", TRANSFORM)
    dataset[0]  # does not use the missing image
    with pytest.raises(CirrDataError) as info:
        dataset[1]  # its target
    text = str(info.value)
    assert "dev-2-0-img0.png: image file is missing" in text
    assert "cap.rc2.val.json pairid 103 target_hard" in text
    with pytest.raises(CirrDataError, match="split.rc2.val.json image 'dev-2-0-img0'"):
        CirrGalleryDataset(cirr_root, "val", TRANSFORM)[2]


@pytest.mark.parametrize("lenient_pillow", [False, True], ids=["default", "after-import-lavis"])
@pytest.mark.parametrize("corruption", ["garbage", "truncated"])
def test_undecodable_image_names_file_and_entry(cirr_root: Path, corruption: str, lenient_pillow: bool, monkeypatch):
    from PIL import ImageFile

    # importing LAVIS sets this global, which makes Pillow pad truncated files silently
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient_pillow)
    path = cirr_root / "dev" / "dev-1-0-img0.png"
    data = path.read_bytes()
    path.write_bytes(b"\x89PNG not really an image" if corruption == "garbage" else data[: len(data) // 2])
    dataset = CirrTripletDataset(cirr_root, "val", TRANSFORM)
    with pytest.raises(CirrDataError) as info:
        dataset[1]  # reference dev-1
    text = str(info.value)
    assert str(path) in text and "cannot decode image" in text and "pairid 103 reference" in text
    assert "\n" not in text
    assert ImageFile.LOAD_TRUNCATED_IMAGES is lenient_pillow  # the caller's setting is restored


# ------------------------------------------------------------------------------------------- transforms


def test_target_pad_wide_image_reaches_target_ratio():
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    padded = TargetPad(1.25)(image)
    assert padded.size == (200, 160)  # 200 / 1.25
    assert padded.getpixel((100, 10)) == (0, 0, 0) and padded.getpixel((100, 150)) == (0, 0, 0)
    assert padded.getpixel((100, 80)) == (255, 255, 255)
    tall = TargetPad(1.25)(Image.new("RGB", (50, 100)))
    assert tall.size == (80, 100)


def test_target_pad_leaves_moderate_ratios_alone():
    pad = TargetPad(1.25)
    for size in [(100, 100), (120, 100), (100, 125)]:
        image = Image.new("RGB", size)
        assert pad(image) is image


def test_target_pad_on_tensor():
    padded = TargetPad(2.0)(torch.ones(3, 10, 40))
    assert padded.shape == (3, 20, 40)
    assert padded[:, :5].abs().sum() == 0 and padded[:, 5:15].min() == 1


def test_target_pad_rejects_ratio_below_one():
    with pytest.raises(ValueError, match="target_ratio"):
        TargetPad(0.5)


def test_cir_image_transform_shape_padding_and_modes():
    transform = cir_image_transform(image_size=56)
    wide = Image.new("RGB", (200, 100), (255, 255, 255))
    out = transform(wide)
    assert out.shape == (3, 56, 56)
    black = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    # 200x160 after padding, 70x56 after resize: top ~10 rows are padding, the middle is the image.
    assert torch.allclose(out[:, 2, 28], black, atol=1e-3)
    assert torch.allclose(out[:, 28, 28], white, atol=1e-3)
    square = transform(Image.new("RGB", (90, 90), (255, 255, 255)))
    assert torch.allclose(square[:, 1, 28], white, atol=1e-3)  # no padding on a square image
    assert transform(Image.new("L", (30, 30))).shape == (3, 56, 56)
    assert transform(Image.new("RGBA", (30, 60))).shape == (3, 56, 56)


@pytest.mark.lavis
@pytest.mark.parametrize("processor, expected", [("blip_caption", "make it blue and round"),
                                                 ("none", "Make it BLUE; and round.")])
def test_builder_applies_the_caption_processor_in_training_and_evaluation(cirr_root: Path, processor, expected):
    # SPRC runs every caption through BLIP's txt_processors["eval"], in training and in validation.
    from omegaconf import OmegaConf

    from lever_plugins.datasets.builders import CirrBuilder

    for split in ("train", "val"):
        _rewrite_entries(cirr_root, split, lambda entries: entries[0].update(caption="Make it BLUE; and round."))
    config = OmegaConf.create({"data_type": "images", "root": str(cirr_root), "image_size": 32,
                               "caption_processor": processor, "splits": ["train", "val"]})
    datasets = CirrBuilder(config).build_datasets()
    assert [datasets[split][0]["text_input"] for split in ("train", "val")] == [expected, expected]
