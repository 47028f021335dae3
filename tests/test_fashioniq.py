"""FashionIQ: the official file layout, SPRC's caption joining, bad input, metrics, and evaluation through the task."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lever_plugins.datasets.fashioniq import (
    FASHIONIQ_CATEGORIES,
    FashionIqDataError,
    FashionIqGalleryDataset,
    FashionIqTripletDataset,
    eval_caption,
    load_fashioniq_image_split,
    load_fashioniq_triplets,
    train_caption_forms,
)
from lever_plugins.datasets.text import blip_caption
from lever_plugins.datasets.transforms import cir_image_transform
from lever_plugins.metrics.cir import fashioniq_category_recalls, fashioniq_metrics
from lever_plugins.schema import RecipeError, from_mapping
from lever_plugins.schemas.cir import FashionIQDatasetSettings

IMAGES_PER_SPLIT = 6
# Two captions per entry, as annotators write them: trailing punctuation, odd capitals, spaces.
CAPTIONS = (["is red.", "Has Long sleeves?"], [" is shorter, ", "is more (formal)"], ["Is BLUE", "has a v-neck."])


def _name(category: str, split: str, i: int) -> str:
    return f"{category[0].upper()}{split[:2].upper()}{i:04d}"


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def make_fashioniq(root: Path, categories=FASHIONIQ_CATEGORIES, splits=("train", "val")) -> Path:
    """A tiny FashionIQ in the official layout: captions/, image_splits/, images/<name>.png."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for c_index, category in enumerate(categories):
        for split in splits:
            names = [_name(category, split, i) for i in range(IMAGES_PER_SPLIT)]
            for i, name in enumerate(names):
                colour = (40 * i % 256, 80 * c_index % 256, 200 - 30 * i)
                Image.new("RGB", (20, 16), colour).save(root / "images" / f"{name}.png")
            _write_json(root / "image_splits" / f"split.{category}.{split}.json", names)
            entries = [
                {"target": names[(i + 1) % len(names)], "candidate": names[i], "captions": list(CAPTIONS[i % len(CAPTIONS)])}
                for i in range(len(names) - 1)
            ]
            _write_json(root / "captions" / f"cap.{category}.{split}.json", entries)
    return root


@pytest.fixture()
def fiq_root(tmp_path: Path) -> Path:
    return make_fashioniq(tmp_path / "fashioniq")


TRANSFORM = cir_image_transform(32)


# ----------------------------------------------------------------------------- reading the layout

def test_official_layout_loads(fiq_root: Path):
    names = load_fashioniq_image_split(fiq_root, "dress", "val")
    assert names == [_name("dress", "val", i) for i in range(IMAGES_PER_SPLIT)]
    triplets = load_fashioniq_triplets(fiq_root, "shirt", "train")
    assert len(triplets) == IMAGES_PER_SPLIT - 1
    first = triplets[0]
    assert (first.category, first.index, first.reference, first.target) == ("shirt", 0, "STR0000", "STR0001")
    assert first.captions == ("is red.", "Has Long sleeves?")

    train = FashionIqTripletDataset(fiq_root, "train", TRANSFORM)
    assert train.train and train.load_target_image and len(train) == 3 * (IMAGES_PER_SPLIT - 1)
    assert [t.category for t in train.triplets[:: IMAGES_PER_SPLIT - 1]] == list(FASHIONIQ_CATEGORIES)
    item = train[0]
    assert item["reference_image"].shape == (3, 32, 32) and item["target_image"].shape == (3, 32, 32)
    assert (item["category"], item["reference_name"], item["target_name"], item["pair_id"]) == ("dress", "DTR0000", "DTR0001", 0)
    batch = train.collater([train[0], train[7]])
    assert batch["reference_image"].shape == (2, 3, 32, 32) and batch["category"] == ["dress", "shirt"]

    val = FashionIqTripletDataset(fiq_root, "val", TRANSFORM, categories=["toptee", "dress"], max_samples_per_category=2)
    assert not val.train and not val.load_target_image and "target_image" not in val[0]
    assert [t.category for t in val.triplets] == ["toptee", "toptee", "dress", "dress"]
    assert val.category_indices("dress") == [2, 3]

    gallery = FashionIqGalleryDataset(fiq_root, "dress", "val", TRANSFORM)
    assert len(gallery) == IMAGES_PER_SPLIT and gallery[5]["image_name"] == "DVA0005"
    assert gallery[5]["image"].shape == (3, 32, 32)


def test_other_image_extension(tmp_path: Path):
    root = make_fashioniq(tmp_path / "fiq", categories=("dress",))
    for png in (root / "images").glob("*.png"):
        Image.open(png).convert("RGB").save(png.with_suffix(".jpg"))
        png.unlink()
    dataset = FashionIqTripletDataset(root, "val", TRANSFORM, categories=["dress"], image_extension=".jpg")
    assert dataset[0]["reference_image"].shape == (3, 32, 32)
    with pytest.raises(FashionIqDataError, match=r"DVA0000\.png: image file is missing"):
        FashionIqTripletDataset(root, "val", TRANSFORM, categories=["dress"])[0]


# ----------------------------------------------------------------------------- captions

def test_eval_caption_is_sprcs_deterministic_join(fiq_root: Path):
    assert eval_caption(["is red.", "Has Long sleeves?"]) == "Is red and Has Long sleeves"
    assert eval_caption([" is shorter, ", "is more (formal)"]) == "Is shorter and is more (formal)"
    assert eval_caption(["Is BLUE", "has a v-neck."]) == "Is blue and has a v-neck"
    val = FashionIqTripletDataset(fiq_root, "val", TRANSFORM, categories=["dress"])
    # then BLIP's caption processor: lower case, ( ) replaced by spaces, spaces collapsed
    assert [val[i]["text_input"] for i in range(3)] == [
        "is red and has long sleeves", "is shorter and is more formal", "is blue and has a v-neck",
    ]
    assert val[1]["text_input"] == val[1]["text_input"]  # no randomness in evaluation


def test_train_caption_is_one_of_four_forms_and_all_occur(fiq_root: Path):
    assert train_caption_forms(["is red.", "Has Long sleeves?"]) == (
        "Is red and Has Long sleeves", "Has long sleeves and is red", "Is red", "Has long sleeves",
    )
    train = FashionIqTripletDataset(fiq_root, "train", TRANSFORM, categories=["dress"])
    forms = {blip_caption(f) for f in train_caption_forms(CAPTIONS[0])}
    assert forms == {"is red and has long sleeves", "has long sleeves and is red", "is red", "has long sleeves"}
    seen = []
    for seed in range(40):
        torch.manual_seed(seed)
        seen.append(train.caption(0))
    assert set(seen) == forms
    torch.manual_seed(3)
    again = train.caption(0)
    assert again == seen[3]  # a function of torch's RNG state


# ----------------------------------------------------------------------------- bad input

def _edit_captions(root: Path, category: str, split: str, edit) -> Path:
    path = root / "captions" / f"cap.{category}.{split}.json"
    entries = json.loads(path.read_text())
    edit(entries)
    path.write_text(json.dumps(entries))
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda e: e[1].pop("target"), r"entry 1: missing 'target'"),
        (lambda e: e[0].pop("candidate"), r"entry 0: missing 'candidate'"),
        (lambda e: e[2].pop("captions"), r"entry 2: missing 'captions'"),
        (lambda e: e[1].update(captions="is red"), r"entry 1: 'captions' must be a list of two strings, got 'is red'"),
        (lambda e: e[1].update(captions=["a", "b", "c"]), r"entry 1: 'captions' must be a list of two strings"),
        (lambda e: e[1].update(captions=["a", 3]), r"entry 1: 'captions' must be a list of two strings, got \['a', 3\]"),
        (lambda e: e[0].update(target=7), r"entry 0: 'target' must be an image name string, got 7"),
        (lambda e: e[3].update(target="NOPE"), r"entry 3: target 'NOPE' is not listed in .*split\.dress\.val\.json"),
        (lambda e: e[0].update(candidate="DTR0000"), r"entry 0: candidate 'DTR0000' is not listed in .*split\.dress\.val\.json"),
        (lambda e: e.__setitem__(0, ["x"]), r"entry 0: expected a JSON object, got list"),
    ],
)
def test_bad_entries_name_file_entry_and_key(fiq_root: Path, edit, message):
    path = _edit_captions(fiq_root, "dress", "val", edit)
    with pytest.raises(FashionIqDataError, match=message) as info:
        FashionIqTripletDataset(fiq_root, "val", TRANSFORM)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_test_split_may_lack_targets(tmp_path: Path):
    root = make_fashioniq(tmp_path / "fiq", categories=("shirt",), splits=("test",))
    _edit_captions(root, "shirt", "test", lambda entries: [e.pop("target") for e in entries])
    triplets = load_fashioniq_triplets(root, "shirt", "test")
    assert all(t.target is None for t in triplets)
    dataset = FashionIqTripletDataset(root, "test", TRANSFORM, categories=["shirt"])
    assert "target_name" not in dataset[0]
    with pytest.raises(ValueError, match="no target image to load"):
        FashionIqTripletDataset(root, "test", TRANSFORM, categories=["shirt"], load_target_image=True)


def test_bad_files_name_the_file(fiq_root: Path):
    split_file = fiq_root / "image_splits" / "split.toptee.val.json"
    split_file.write_text(json.dumps(["TVA0000", "TVA0001", "TVA0000"]))
    with pytest.raises(FashionIqDataError, match=r"split\.toptee\.val\.json: item 2: image 'TVA0000' is listed twice"):
        load_fashioniq_image_split(fiq_root, "toptee", "val")
    split_file.write_text(json.dumps({"TVA0000": "x"}))
    with pytest.raises(FashionIqDataError, match=r"split\.toptee\.val\.json: expected a JSON list of image names, got dict"):
        FashionIqGalleryDataset(fiq_root, "toptee", "val", TRANSFORM)
    split_file.write_text("[\"TVA0000\",")
    with pytest.raises(FashionIqDataError, match=r"split\.toptee\.val\.json: not valid JSON \(line 1"):
        load_fashioniq_image_split(fiq_root, "toptee", "val")
    (fiq_root / "captions" / "cap.shirt.train.json").unlink()
    with pytest.raises(FashionIqDataError, match=r"cap\.shirt\.train\.json: file not found \(expected the FashionIQ layout"):
        FashionIqTripletDataset(fiq_root, "train", TRANSFORM, categories=["shirt"])
    with pytest.raises(ValueError, match="unknown FashionIQ category 'shoes'"):
        load_fashioniq_triplets(fiq_root, "shoes", "val")


def test_missing_and_corrupt_images_name_file_and_entry(fiq_root: Path):
    (fiq_root / "images" / "DTR0001.png").unlink()
    train = FashionIqTripletDataset(fiq_root, "train", TRANSFORM, categories=["dress"])
    with pytest.raises(FashionIqDataError, match=r"DTR0001\.png: image file is missing \(referenced by .*cap\.dress\.train\.json entry 0 target\)"):
        train[0]
    (fiq_root / "images" / "DVA0002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    gallery = FashionIqGalleryDataset(fiq_root, "dress", "val", TRANSFORM)
    with pytest.raises(FashionIqDataError, match=r"DVA0002\.png: cannot decode image .*split\.dress\.val\.json image 'DVA0002'"):
        gallery[2]


def test_dataset_settings_validate_categories_and_splits(tmp_path: Path):
    def problems(block):
        found: list[str] = []
        from_mapping(FashionIQDatasetSettings, {"root": str(tmp_path), **block}, "datasets.lever_fashioniq", found)
        return found

    assert problems({}) == []
    settings = FashionIQDatasetSettings(root=str(tmp_path))
    assert settings.categories == ["dress", "shirt", "toptee"] and settings.splits == ["train", "val"]
    assert any(p.startswith("datasets.lever_fashioniq.categories") and "shoes" in p for p in problems({"categories": ["shoes"]}))
    assert any("listed twice" in p for p in problems({"categories": ["dress", "dress"]}))
    assert any("at least one" in p for p in problems({"categories": []}))
    assert any(p.startswith("datasets.lever_fashioniq.splits") for p in problems({"splits": ["test"]}))
    assert any("image_extension" in p for p in problems({"image_extension": "png"}))


# ----------------------------------------------------------------------------- metrics

def _sims_with_target_ranks(ranks: list[int], gallery_size: int) -> tuple[torch.Tensor, list[str], list[str]]:
    """Query q's target is gallery image q; exactly ranks[q] other images score above it."""
    gallery = [f"g{j}" for j in range(gallery_size)]
    sims = torch.zeros(len(ranks), gallery_size)
    for q, rank in enumerate(ranks):
        others = [j for j in range(gallery_size) if j != q]
        sims[q, others[:rank]] = 1.0
        sims[q, q] = 0.5
    return sims, [gallery[q] for q in range(len(ranks))], gallery


def test_fashioniq_recalls_and_average_by_hand():
    # dress: target ranks 0, 10, 49, 55 -> R@10 = 1/4 = 25 %, R@50 = 3/4 = 75 %
    dress = fashioniq_category_recalls(*_sims_with_target_ranks([0, 10, 49, 55], 60))
    assert dress == {"r10": 25.0, "r50": 75.0}
    # shirt: ranks 3, 50 -> R@10 = 50 %, R@50 = 50 %
    shirt = fashioniq_category_recalls(*_sims_with_target_ranks([3, 50], 60))
    assert shirt == {"r10": 50.0, "r50": 50.0}
    metrics = fashioniq_metrics({"dress": dress, "shirt": shirt})
    # averages over categories (not over queries): (25 + 50) / 2, (75 + 50) / 2, then (37.5 + 62.5) / 2
    assert metrics == {
        "dress_r10": 25.0, "dress_r50": 75.0, "shirt_r10": 50.0, "shirt_r50": 50.0,
        "average_r10": 37.5, "average_r50": 62.5, "average_recall": 50.0,
    }
    # = mean over categories of (R@10 + R@50) / 2: dress 50, shirt 50
    assert metrics["average_recall"] == ((25 + 75) / 2 + (50 + 50) / 2) / 2


def test_fashioniq_keeps_the_reference_in_the_gallery_and_breaks_ties_by_gallery_order():
    gallery = [f"g{j}" for j in range(12)]
    # The reference g0 scores highest, nine more images score above the target g11: rank 10 (not 9).
    sims = torch.tensor([[1.0] * 10 + [0.0, 0.5]])
    assert fashioniq_category_recalls(sims, ["g11"], gallery) == {"r10": 0.0, "r50": 100.0}
    # All equal: the target at gallery position 10 has ten images before it.
    assert fashioniq_category_recalls(torch.ones(1, 12), ["g10"], gallery)["r10"] == 0.0
    assert fashioniq_category_recalls(torch.ones(1, 12), ["g9"], gallery)["r10"] == 100.0


def test_fashioniq_metric_errors():
    gallery = ["a", "b"]
    with pytest.raises(ValueError, match="1 target\\(s\\) are not in the gallery, first: query 0 target 'z'"):
        fashioniq_category_recalls(torch.zeros(1, 2), ["z"], gallery)
    with pytest.raises(ValueError, match="sims must have shape"):
        fashioniq_category_recalls(torch.zeros(2, 2), ["a"], gallery)
    with pytest.raises(ValueError, match="appears twice"):
        fashioniq_category_recalls(torch.zeros(1, 2), ["a"], ["a", "a"])
    with pytest.raises(ValueError, match="at least one category"):
        fashioniq_metrics({})


# ----------------------------------------------------------------------------- through the builder, model and task

@pytest.mark.lavis
def test_builder_model_and_task_evaluate_per_category(fiq_root: Path, tmp_path: Path, monkeypatch):
    from lever_plugins.compat import import_lavis

    import_lavis()
    import lever_plugins.registry  # noqa: F401
    from lavis.common.registry import registry
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from lever_plugins.models.blip2_cir import Blip2CirModel
    from lever_plugins.tasks.composed_retrieval import ComposedRetrievalTask

    builder_cls = registry.get_builder_class("lever_fashioniq")
    cfg = OmegaConf.create({"data_type": "images", "root": str(fiq_root), "image_size": 64, "categories": ["dress", "toptee"]})
    datasets = builder_cls(cfg).build_datasets()
    assert set(datasets) == {"train", "val"}
    assert set(datasets["val"].galleries) == {"dress", "toptee"} and not hasattr(datasets["train"], "galleries")
    with pytest.raises(RecipeError, match="datasets.lever_fashioniq.categoies: unknown key"):
        builder_cls(OmegaConf.create({"data_type": "images", "root": str(fiq_root), "categoies": ["dress"]}))

    model = Blip2CirModel.from_config({"arch": "lever_blip2_cir", "model_type": "tiny"})
    train = datasets["train"]
    loss = model(train.collater([train[i] for i in range(4)]))["loss"]
    assert torch.isfinite(loss)

    model.eval()
    val = datasets["val"]
    task = ComposedRetrievalTask()
    result = task.evaluation(model, DataLoader(val, batch_size=3, collate_fn=val.collater))
    assert set(result["categories"]) == {"dress", "toptee"}
    dress = result["categories"]["dress"]
    assert dress["sims"].shape == (IMAGES_PER_SPLIT - 1, IMAGES_PER_SPLIT)
    assert dress["gallery_names"] == load_fashioniq_image_split(fiq_root, "dress", "val")
    assert dress["target_names"] == [t.target for t in val.triplets if t.category == "dress"]

    monkeypatch.setitem(registry.mapping["paths"], "result_dir", str(tmp_path))
    metrics = task.after_evaluation(result, "val", 0)
    assert set(metrics) == {
        "dress_r10", "dress_r50", "toptee_r10", "toptee_r50", "average_r10", "average_r50", "average_recall", "agg_metrics",
    }
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert metrics["dress_r10"] <= metrics["dress_r50"] and metrics["agg_metrics"] == metrics["average_recall"]
    assert metrics["average_recall"] == pytest.approx(
        ((metrics["dress_r10"] + metrics["dress_r50"]) / 2 + (metrics["toptee_r10"] + metrics["toptee_r50"]) / 2) / 2
    )
    assert json.loads((tmp_path / "val_epoch0_metrics.json").read_text()) == metrics


@pytest.mark.lavis
@pytest.mark.slow
def test_one_epoch_through_lavis_train_sequence_with_gate_maps(fiq_root: Path, tmp_path: Path):
    """LAVIS's train.py sequence on the tiny FashionIQ: train all categories, validate per category, gate maps."""
    from types import SimpleNamespace

    import yaml

    from lever_plugins.compat import import_lavis

    import_lavis()
    import lever_plugins.registry  # noqa: F401
    import lavis.tasks as tasks
    from lavis.common.config import Config
    from lavis.common.registry import registry

    recipe = {
        "model": {"arch": "lever_blip2_cir", "model_type": "tiny", "use_gated_fusion": True, "gated_fusion": {"num_heads": 4}},
        "datasets": {"lever_fashioniq": {"root": str(fiq_root), "image_size": 64}},
        "run": {
            "task": "lever_composed_retrieval", "runner": "lever_runner", "device": "cpu", "lr_sched": "lever_onecycle_lr",
            "init_lr": 1.0e-3, "max_epoch": 1, "batch_size_train": 4, "batch_size_eval": 4, "progress_bar": False,
            "output_dir": str(tmp_path / "out"), "train_splits": ["train"], "valid_splits": ["val"], "save_gate_maps": 2,
        },
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cfg = Config(SimpleNamespace(cfg_path=str(path), options=None))
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    runner = registry.get_runner_class("lever_runner")(cfg=cfg, job_id="job", task=task, model=model, datasets=datasets)
    runner.train()
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in records] == ["train", "val"]
    val = records[1]
    for key in ("dress_r10", "shirt_r50", "toptee_r10", "average_r10", "average_r50", "average_recall"):
        assert 0.0 <= val[key] <= 100.0, key
    assert val["agg_metrics"] == val["average_recall"] and val["best_epoch"] == 0
    assert (out / "checkpoint_best.pth").is_file()
    assert len(list((out / "gate_maps").glob("*.png"))) == 3  # two queries and their grid
    assert (out / "gate_maps" / "grid.png").is_file()
