"""Flickr30K/COCO-format retrieval data: the demo generator, the loaders' checks and the datasets."""
from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from lever_plugins.datasets.demo_retrieval import (
    CAPTIONS_PER_IMAGE,
    MARKER_NAME,
    dense_caption,
    generate_demo_retrieval,
)
from lever_plugins.datasets.retrieval import (
    RetrievalDataError,
    RetrievalEvalDataset,
    RetrievalTrainDataset,
    build_split,
    load_dense_captions,
    load_eval_annotations,
    load_train_annotations,
    retrieval_image_transform,
)

OBJECT = re.compile(r"a (red|green|blue|yellow|purple|orange) (circle|square|triangle|diamond|cross)")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_retrieval")
    generate_demo_retrieval(root, num_train=6, num_val=4, num_test=3, image_size=32)
    return root


def _build(root, split, **overrides):
    dense_path = root / "dense_captions.json"
    if "dense" not in overrides:
        overrides["dense"] = load_dense_captions(dense_path)
    kwargs = dict(root=root, images="images", annotation_file=f"annotations/{split}.json", dense_path=dense_path, image_size=32)
    kwargs.update(overrides)
    return build_split(split, **kwargs)


def test_demo_files_are_in_lavis_retrieval_format(demo_root):
    train = json.loads((demo_root / "annotations" / "train.json").read_text())
    assert len(train) == 6 * CAPTIONS_PER_IMAGE
    assert set(train[0]) == {"image", "caption", "image_id"} and isinstance(train[0]["caption"], str)
    for split, count in (("val", 4), ("test", 3)):
        entries = json.loads((demo_root / "annotations" / f"{split}.json").read_text())
        assert len(entries) == count
        assert all(set(e) == {"image", "caption"} and len(e["caption"]) == CAPTIONS_PER_IMAGE for e in entries)
        assert all(len(set(e["caption"])) == CAPTIONS_PER_IMAGE for e in entries)  # five different captions
    dense = json.loads((demo_root / "dense_captions.json").read_text())
    images = {e["image"] for e in train} | {e["image"] for s in ("val", "test")
                                             for e in json.loads((demo_root / "annotations" / f"{s}.json").read_text())}
    assert set(dense) == images
    assert all((demo_root / "images" / image).is_file() for image in images)


def test_every_object_a_caption_names_is_in_its_images_dense_caption(demo_root):
    dense = load_dense_captions(demo_root / "dense_captions.json")
    entries = load_eval_annotations(demo_root / "annotations" / "val.json")
    for entry in entries:
        described = set(OBJECT.findall(dense[entry.image]))
        assert 2 <= len(described) <= 3
        for caption in entry.captions:
            named = set(OBJECT.findall(caption))
            assert named and named <= described, (caption, dense[entry.image])


def test_dense_caption_lists_objects_with_places():
    objects = [("circle", "red", "left"), ("square", "blue", "top"), ("cross", "green", "bottom")]
    assert dense_caption(objects) == "a red circle on the left, a blue square at the top and a green cross at the bottom"
    assert dense_caption(objects[:2]) == "a red circle on the left and a blue square at the top"


def test_generator_is_idempotent_and_never_overwrites_other_files(tmp_path, demo_root):
    marker = (demo_root / MARKER_NAME).stat().st_mtime_ns
    image = next((demo_root / "images" / "train").iterdir())
    before = image.stat().st_mtime_ns
    generate_demo_retrieval(demo_root, num_train=6, num_val=4, num_test=3, image_size=32)
    assert (demo_root / MARKER_NAME).stat().st_mtime_ns == marker and image.stat().st_mtime_ns == before
    (tmp_path / "mine.txt").write_text("real data")
    with pytest.raises(FileExistsError, match="refusing"):
        generate_demo_retrieval(tmp_path, num_train=2, num_val=1, num_test=1)
    assert (tmp_path / "mine.txt").read_text() == "real data"


def test_same_seed_same_bytes(tmp_path):
    a = generate_demo_retrieval(tmp_path / "a", num_train=2, num_val=1, num_test=1, image_size=16)
    b = generate_demo_retrieval(tmp_path / "b", num_train=2, num_val=1, num_test=1, image_size=16)
    for relative in ("annotations/train.json", "dense_captions.json", "images/val/val-00000.png"):
        assert (a / relative).read_bytes() == (b / relative).read_bytes()


def test_train_dataset_items_share_image_id_per_image(demo_root):
    dataset = _build(demo_root, "train")
    assert isinstance(dataset, RetrievalTrainDataset) and len(dataset) == 30
    batch = dataset.collater([dataset[i] for i in range(10)])
    assert batch["image"].shape == (10, 3, 32, 32)
    assert batch["image_id"].tolist() == [0] * 5 + [1] * 5  # captions of one image are consecutive in the file
    dense = load_dense_captions(demo_root / "dense_captions.json")
    assert batch["dense_text"][0] == dense[dataset.entries[0].image] and batch["dense_text"][4] == batch["dense_text"][0]
    assert batch["dense_text"][5] != batch["dense_text"][0]


def test_eval_dataset_indexes_captions_image_by_image(demo_root):
    dataset = _build(demo_root, "val", max_eval_images=3)
    assert isinstance(dataset, RetrievalEvalDataset) and len(dataset) == 3
    assert len(dataset.text) == 15 and dataset.txt2img == [i // 5 for i in range(15)]
    assert dataset.img2txt[2] == [10, 11, 12, 13, 14]
    assert len(dataset.dense_text) == 3 and dataset[1]["index"] == 1
    assert dataset[1]["image"].shape == (3, 32, 32)


def test_transforms_eval_is_deterministic_and_flip_mirrors(demo_root):
    from PIL import Image

    image = Image.open(next((demo_root / "images" / "val").iterdir()))
    evaluation = retrieval_image_transform(32, "none")
    assert torch.equal(evaluation(image), evaluation(image))
    flipped = [retrieval_image_transform(32, "crop_flip")(image) for _ in range(8)]
    assert any(not torch.equal(flipped[0], other) for other in flipped[1:])
    with pytest.raises(ValueError, match="augment"):
        retrieval_image_transform(32, "flip")


def _write(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload) if not isinstance(payload, str) else payload)
    return path


@pytest.mark.parametrize(
    "entries, message",
    [
        ([{"image": "a.png", "caption": "x"}], "entry 0 (image 'a.png'): missing 'image_id'"),
        ([{"caption": "x", "image_id": 1}], "entry 0: missing 'image'"),
        ([{"image": "a.png", "caption": "", "image_id": 1}], "'caption' must be a non-empty string"),
        ([{"image": "a.png", "caption": "x", "image_id": True}], "'image_id' must be a string or an integer"),
        ({"image": "a.png"}, "expected a JSON list"),
        ("[{", "not valid JSON (line 1"),
    ],
)
def test_train_annotation_problems_name_file_and_entry(tmp_path, entries, message):
    path = _write(tmp_path / "train.json", entries)
    with pytest.raises(RetrievalDataError) as info:
        load_train_annotations(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_eval_annotation_problems(tmp_path):
    path = _write(tmp_path / "val.json", [{"image": "a.png", "caption": ["ok"]}, {"image": "b.png", "caption": "one"}])
    with pytest.raises(RetrievalDataError, match=r"entry 1 \(image 'b.png'\): 'caption' must be a non-empty list"):
        load_eval_annotations(path)
    path = _write(tmp_path / "val.json", [{"image": "a.png", "caption": ["ok"]}, {"image": "a.png", "caption": ["x"]}])
    with pytest.raises(RetrievalDataError, match="image repeats entry 0"):
        load_eval_annotations(path)


def test_missing_dense_caption_is_an_error_or_empty_by_policy(tmp_path, demo_root, caplog):
    dense = load_dense_captions(demo_root / "dense_captions.json")
    first = load_eval_annotations(demo_root / "annotations" / "val.json")[0].image
    del dense[first]
    with pytest.raises(RetrievalDataError) as info:
        _build(demo_root, "val", dense=dense, policy_key="datasets.lever_flickr30k.missing_dense_caption")
    text = str(info.value)
    assert f"no dense caption for image {first!r}" in text and "val.json entry 0" in text
    assert "datasets.lever_flickr30k.missing_dense_caption: empty" in text
    with caplog.at_level(logging.WARNING):
        dataset = _build(demo_root, "val", dense=dense, missing_dense_caption="empty")
    assert dataset.dense_text[0] == "" and dataset.dense_text[1] != ""
    assert "1 of 4 images" in caplog.text



def test_blank_dense_caption_counts_as_missing(demo_root, caplog):
    # A captioning run that failed on an image often leaves "" behind: under policy "error" that must not pass.
    dense = load_dense_captions(demo_root / "dense_captions.json")
    first = load_eval_annotations(demo_root / "annotations" / "val.json")[0].image
    dense[first] = "  "
    with pytest.raises(RetrievalDataError, match=f"no dense caption for image {re.escape(repr(first))}.*blank"):
        _build(demo_root, "val", dense=dense)
    with caplog.at_level(logging.WARNING):
        dataset = _build(demo_root, "val", dense=dense, missing_dense_caption="empty")
    assert dataset.dense_text[0] == "" and "1 of 4 images" in caplog.text

def test_missing_and_undecodable_images(tmp_path, demo_root):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    _write(root / "annotations" / "val.json", [{"image": "gone.png", "caption": ["a red circle"]}])
    with pytest.raises(RetrievalDataError, match=r"val.json: entry 0: image file not found: .*gone.png"):
        _build(root, "val", dense={"gone.png": "x"})
    (root / "images" / "gone.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    dataset = _build(root, "val", dense={"gone.png": "x"})
    with pytest.raises(RetrievalDataError) as info:
        dataset[0]
    assert "gone.png: cannot decode image" in str(info.value) and "val.json entry 0" in str(info.value)


def test_dense_caption_file_must_map_images_to_strings(tmp_path):
    with pytest.raises(RetrievalDataError, match="expected a JSON object"):
        load_dense_captions(_write(tmp_path / "d.json", ["a"]))
    with pytest.raises(RetrievalDataError, match=r"image 'a.png': the dense caption must be a string"):
        load_dense_captions(_write(tmp_path / "d.json", {"a.png": ["x"]}))
    with pytest.raises(RetrievalDataError, match="dense-caption file not found"):
        load_dense_captions(tmp_path / "none.json")
