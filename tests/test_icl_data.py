"""ICD-selection data: VQAv2 files, beam / pool files (errors name file and question_id), JSONL, splits, settings."""
from __future__ import annotations

import json

import pytest

from _icl_helpers import write_vqa_files
from lever_plugins.icl.data import (
    IclDataError, append_jsonl, load_beam_files, load_vqa_split, read_jsonl, split_by_question_id,
)
from lever_plugins.schema import from_mapping
from lever_plugins.schemas.icl import (
    IclSelectionRunSettings, PointerSelectorSettings, VlmSettings, VqaIclDatasetSettings,
)

ROWS = [
    (30, 3, "what color is the kite ?", ["red"] * 9 + ["blue"]),
    (10, 1, "what color is the lamp ?", ["blue"] * 10),
    (20, 2, "what color is the boat ?", ["green"] * 6 + ["red"] * 4),
]


def test_vqa_split_joins_by_question_id_and_sorts(tmp_path):
    qpath, apath = write_vqa_files(tmp_path, "train", ROWS)
    split = load_vqa_split("train", qpath, apath, images_dir="/imgs", image_template="COCO_train2014_{image_id:012d}.jpg")
    assert split.question_ids == [10, 20, 30]
    kite = split[30]
    assert kite.answer == "red" and kite.answers.count("blue") == 1 and len(kite.answers) == 10
    assert kite.image_path == "/imgs/COCO_train2014_000000000003.jpg"
    assert 20 in split and 40 not in split


def test_question_without_annotation_names_file_and_question_id(tmp_path):
    qpath, apath = write_vqa_files(tmp_path, "train", ROWS)
    with open(apath) as handle:
        annotations = json.load(handle)
    annotations["annotations"] = [a for a in annotations["annotations"] if a["question_id"] != 20]
    with open(apath, "w") as handle:
        json.dump(annotations, handle)
    with pytest.raises(IclDataError) as info:
        load_vqa_split("train", qpath, apath)
    assert apath in str(info.value) and "question_id 20" in str(info.value)


def test_duplicate_question_id_and_wrong_format_are_errors(tmp_path):
    qpath, apath = write_vqa_files(tmp_path, "train", ROWS + [ROWS[0]])
    with pytest.raises(IclDataError, match="question_id 30"):
        load_vqa_split("train", qpath, apath)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question_id": 1}]))
    with pytest.raises(IclDataError, match="VQAv2 questions format"):
        load_vqa_split("train", str(bad), apath)


def _beam_files(tmp_path, beams, pools):
    beams_path, pools_path = tmp_path / "beams.json", tmp_path / "pools.json"
    beams_path.write_text(json.dumps(beams))
    pools_path.write_text(json.dumps(pools))
    return str(beams_path), str(pools_path)


def test_beam_files_round_trip(tmp_path):
    beams, pools = _beam_files(tmp_path, {"30": {"icds": [1, 0], "scores": [0.5, 0.1]}}, {"30": [10, 20]})
    qpath, apath = write_vqa_files(tmp_path, "train", ROWS)
    entries = load_beam_files(beams, pools, pool_size=2, candidates=load_vqa_split("train", qpath, apath))
    assert len(entries) == 1 and entries[0].question_id == 30
    assert entries[0].pool == (10, 20) and entries[0].icds == (1, 0) and entries[0].scores == (0.5, 0.1)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"icds": [0, 5], "scores": [1.0, 0.5]}, "icd index 5 is outside the pool of 3 candidates"),
        ({"icds": [0, -1], "scores": [1.0, 0.5]}, "icd index -1 is outside the pool"),
        ({"icds": [1, 1], "scores": [1.0, 0.5]}, "repeats a candidate"),
        ({"icds": [0, 1], "scores": [1.0]}, "one number per icd"),
    ],
)
def test_bad_beam_entries_name_the_file_and_question_id(tmp_path, record, message):
    beams, pools = _beam_files(tmp_path, {"7": record}, {"7": [1, 2, 3]})
    with pytest.raises(IclDataError) as info:
        load_beam_files(beams, pools)
    text = str(info.value)
    assert text.startswith(f"{beams}: question_id 7: ") and message in text


def test_all_beams_file_round_trip_and_old_files_still_load(tmp_path):
    best = {"icds": [1, 0], "scores": [0.5, 0.1]}
    beams, pools = _beam_files(tmp_path, {"30": best}, {"30": [10, 20, 30]})
    everything = tmp_path / "beams_all.json"
    everything.write_text(json.dumps({"30": [best, {"icds": [2, 1], "scores": [0.4, 0.05]}, {"icds": [1, 2], "scores": [0.5, -0.2]}]}))
    (entry,) = load_beam_files(beams, pools, all_beams_path=str(everything))
    assert entry.icds == (1, 0) and entry.scores == (0.5, 0.1)
    assert entry.sequences == (((1, 0), (0.5, 0.1)), ((2, 1), (0.4, 0.05)), ((1, 2), (0.5, -0.2)))
    # The seeds' format (or a run from before beams_all.json): the best beam only.
    (old,) = load_beam_files(beams, pools)
    assert old.beams == () and old.sequences == (((1, 0), (0.5, 0.1)),)


@pytest.mark.parametrize(
    "listed, message",
    [
        ({"30": [{"icds": [0, 1], "scores": [0.3, 0.1]}]}, "first (best) beam [0, 1] / [0.3, 0.1] is not the entry of"),
        ({"30": [{"icds": [1, 0], "scores": [0.5, 0.1]}, {"icds": [1, 3], "scores": [0.1, 0.1]}]},
         "question_id 30 beam 1: icd index 3 is outside the pool of 3"),
        ({"30": [{"icds": [1, 0], "scores": [0.5, 0.1]}, {"icds": [2, 1], "scores": [0.1]}]}, "beam 1: 'scores' must hold one number per icd"),
        ({"30": [{"icds": [1, 0], "scores": [0.5, 0.1]}, {"icds": [2], "scores": [0.1]}]}, "beams of different lengths [1, 2]"),
        ({"30": []}, "expected a non-empty list of beams"),
        ({"30": [{"icds": [1, 0], "scores": [0.5, 0.1]}], "31": [{"icds": [1, 0], "scores": [0.5, 0.1]}]}, "extra [31]"),
        ({}, "missing [30]"),
    ],
)
def test_all_beams_file_problems_name_the_file_and_question_id(tmp_path, listed, message):
    beams, pools = _beam_files(tmp_path, {"30": {"icds": [1, 0], "scores": [0.5, 0.1]}}, {"30": [10, 20, 30]})
    everything = tmp_path / "beams_all.json"
    everything.write_text(json.dumps(listed))
    with pytest.raises(IclDataError) as info:
        load_beam_files(beams, pools, all_beams_path=str(everything))
    assert str(info.value).startswith(f"{everything}: ") and message in str(info.value)


def _pointer_data(tmp_path, with_all_beams=True, **keys):
    """40 supporting questions, each a beam-search query with a pool of 4 and 3 kept beams of 2 icds."""
    import torch

    from lever_plugins.icl import beam_search as bs
    from lever_plugins.icl import embed as features

    ids = list(range(100, 140))
    rows = [(q, q, f"what color is the kite {q} ?", ["red"] * 10) for q in ids]
    train_q, train_a = write_vqa_files(tmp_path / "data", "train", rows)
    eval_q, eval_a = write_vqa_files(tmp_path / "data", "eval", rows[:2])
    feature_dir, beam_dir = tmp_path / "features", tmp_path / "beams"
    feature_dir.mkdir()
    beam_dir.mkdir()
    table = {"question_ids": torch.tensor(ids), "embeddings": torch.randn(len(ids), 8)}
    for name in features.TABLES:
        torch.save(table, feature_dir / f"{name}.pt")
    (feature_dir / features.MANIFEST).write_text(json.dumps({"complete": True}))
    pools, best, everything = {}, {}, {}
    for q in ids:
        pools[str(q)] = [c for c in ids if c != q][:4]
        kept = [{"icds": [b, (b + 1) % 4], "scores": [0.9 - 0.1 * b + q / 1000, 0.01 * b - q / 10000]} for b in range(3)]
        best[str(q)], everything[str(q)] = kept[0], kept
    (beam_dir / bs.BEAMS_FILE).write_text(json.dumps(best))
    (beam_dir / bs.POOLS_FILE).write_text(json.dumps(pools))
    if with_all_beams:
        (beam_dir / bs.ALL_BEAMS_FILE).write_text(json.dumps(everything))
    settings = VqaIclDatasetSettings(train_questions=train_q, train_annotations=train_a, eval_questions=eval_q,
                                     eval_annotations=eval_a, val_fraction=0.25, **keys)
    return settings, load_vqa_split("train", train_q, train_a), str(feature_dir), str(beam_dir), everything


def test_pointer_datasets_train_on_every_beam_split_by_question_id(tmp_path):
    import torch

    from lever_plugins.icl.pipeline import build_pointer_datasets

    settings, train, feature_dir, beam_dir, everything = _pointer_data(tmp_path, beam_score_transform="none")
    assert settings.train_on == "all"  # the default, as Lever-LM
    out = build_pointer_datasets(settings, train, feature_dir, beam_dir)
    train_ds, val_ds = out["train"], out["val"]
    train_ids = {e.question_id for e in train_ds.entries}
    val_ids = {e.question_id for e in val_ds.entries}
    assert train_ids and val_ids and train_ids.isdisjoint(val_ids) and len(train_ids | val_ids) == 40
    assert len(train_ds) == 3 * len(train_ids) and len(val_ds) == len(val_ids)  # val: the best beam only
    seen = set()
    for index in range(len(train_ds)):
        item = train_ds[index]
        beam = everything[str(item["question_id"])][item["beam_rank"]]
        # Each sequence comes with its own labels and its own scores.
        assert item["labels"].tolist() == beam["icds"]
        assert item["beam_scores"].tolist() == pytest.approx(beam["scores"])
        seen.add((item["question_id"], item["beam_rank"]))
    assert seen == {(q, b) for q in train_ids for b in range(3)}
    assert {val_ds[i]["beam_rank"] for i in range(len(val_ds))} == {0}
    batch = train_ds.collater([train_ds[i] for i in range(5)])
    assert batch["beam_rank"].dtype == torch.long and batch["labels"].shape == (5, 2)

    best_only = build_pointer_datasets(
        VqaIclDatasetSettings(**{**settings.to_dict(), "train_on": "best"}), train, feature_dir, beam_dir
    )
    assert len(best_only["train"]) == len(train_ids) and {e.question_id for e in best_only["train"].entries} == train_ids


def test_pointer_datasets_fit_the_score_transform_on_the_training_sequences(tmp_path):
    import torch

    from lever_plugins.icl.pipeline import build_pointer_datasets

    settings, train, feature_dir, beam_dir, _ = _pointer_data(tmp_path)
    assert settings.beam_score_transform == "zscore"
    out = build_pointer_datasets(settings, train, feature_dir, beam_dir)
    raw = out["train"].raw_beam_scores.double()
    mean, std = raw.mean(), raw.std(unbiased=False)
    torch.testing.assert_close(out["train"].beam_scores.double(), (raw - mean) / std, atol=1e-5, rtol=0)
    # Validation scores go through the training statistics, not their own.
    val_raw = out["val"].raw_beam_scores.double()
    torch.testing.assert_close(out["val"].beam_scores.double(), (val_raw - mean) / std, atol=1e-5, rtol=0)
    # The first steps (~0.8-1.0) and second steps (~0.0) land on either side of 0.
    assert (out["train"].beam_scores[:, 0] > 0.5).all() and (out["train"].beam_scores[:, 1] < -0.5).all()
    ranked = build_pointer_datasets(VqaIclDatasetSettings(**{**settings.to_dict(), "beam_score_transform": "rank"}),
                                    train, feature_dir, beam_dir)["train"].beam_scores
    assert ranked.mean().abs() < 1e-6 and ranked.min() > -3 and ranked.max() < 3


def test_pointer_datasets_from_best_beam_files_train_on_the_best_beam(tmp_path, caplog):
    from lever_plugins.icl.pipeline import build_pointer_datasets

    settings, train, feature_dir, beam_dir, _ = _pointer_data(tmp_path, with_all_beams=False)
    with caplog.at_level("WARNING"):
        out = build_pointer_datasets(settings, train, feature_dir, beam_dir)
    assert len(out["train"]) == len(out["train"].entries)
    assert "training on the best beam of each query" in caplog.text


def test_pool_problems_are_reported(tmp_path):
    beams, pools = _beam_files(tmp_path, {"7": {"icds": [0], "scores": [1.0]}}, {"8": [1, 2]})
    with pytest.raises(IclDataError, match=r"no candidate pool for question_id 7"):
        load_beam_files(beams, pools)
    beams, pools = _beam_files(tmp_path, {"7": {"icds": [0], "scores": [1.0]}}, {"7": [1, 2]})
    with pytest.raises(IclDataError, match="pool of 2 candidates, expected K = 3"):
        load_beam_files(beams, pools, pool_size=3)
    qpath, apath = write_vqa_files(tmp_path, "train", ROWS)
    beams, pools = _beam_files(tmp_path, {"7": {"icds": [0], "scores": [1.0]}}, {"7": [10, 99]})
    with pytest.raises(IclDataError, match=r"not in the train split: \[99\]"):
        load_beam_files(beams, pools, candidates=load_vqa_split("train", qpath, apath))


def test_jsonl_drops_and_repairs_an_interrupted_last_line(tmp_path):
    path = str(tmp_path / "part.jsonl")
    append_jsonl(path, [{"question_id": 1}, {"question_id": 2}])
    with open(path, "a") as handle:
        handle.write('{"question_id": 3, "ic')  # a kill in the middle of a write
    assert [r["question_id"] for r in read_jsonl(path)] == [1, 2]
    read_jsonl(path, repair=True)
    append_jsonl(path, [{"question_id": 4}])
    assert [r["question_id"] for r in read_jsonl(path)] == [1, 2, 4]
    with open(path, "a") as handle:
        handle.write("not json\n")
    with pytest.raises(IclDataError, match=r"part.jsonl:4: malformed line"):
        read_jsonl(path)


def test_split_by_question_id_is_stable_and_order_free():
    ids = list(range(1000, 1400))
    train, val = split_by_question_id(ids, 0.1, seed=0)
    assert set(train).isdisjoint(val) and sorted(train + val) == ids
    assert 20 <= len(val) <= 60
    shuffled_train, shuffled_val = split_by_question_id(list(reversed(ids)), 0.1, seed=0)
    assert (shuffled_train, shuffled_val) == (train, val)
    # An id's side does not depend on the other ids.
    expected = set(val) & set(ids[:200])
    assert expected and set(split_by_question_id(ids[:200], 0.1, seed=0)[1]) == expected
    _, other_seed = split_by_question_id(ids, 0.1, seed=1)
    assert other_seed != val
    assert split_by_question_id([5, 6], 0.01, seed=0)[1]  # never an empty val side


# ------------------------------------------------------------------------------------------ settings


def test_version_specific_keys_are_refused_under_another_version():
    with pytest.raises(ValueError, match="num_heads: read only by model_type v2"):
        PointerSelectorSettings(arch="lever_pointer_selector", model_type="v1", num_heads=8)
    with pytest.raises(ValueError, match="ranking_loss_weight: read only by model_type v3"):
        PointerSelectorSettings(arch="lever_pointer_selector", model_type="v2", ranking_loss_weight=0.5)
    with pytest.raises(ValueError, match="teacher_checkpoint: ranking_loss_type radi_listwise distils"):
        PointerSelectorSettings(arch="lever_pointer_selector", model_type="v3", ranking_loss_type="radi_listwise")
    settings = PointerSelectorSettings(arch="lever_pointer_selector", model_type="v2", num_heads=8)
    assert settings.num_heads == 8


def _run(**blocks):
    problems: list[str] = []
    base = {"task": "lever_icl_selection", "output_dir": "/tmp/x",
            "embed": {"blip2": {"qformer": {"vocab_file": "v.txt"}}}}
    settings = from_mapping(IclSelectionRunSettings, {**base, **blocks}, "run", problems)
    return settings, problems


def test_run_settings_report_stage_order_templates_and_typos():
    _, problems = _run(stages=["train", "embed"])
    assert problems == ["run.stages: must follow the pipeline order ['embed', 'beam_search', 'train', 'select', 'evaluate'], got ['train', 'embed']"]
    _, problems = _run(vlm={"query_template": "Q: {question} {answr}"}, beam_search={"beem_size": 3})
    assert any(p.startswith("run.vlm.query_template: unknown placeholder(s) ['answr']") for p in problems)
    assert "run.beam_search.beem_size: unknown key (did you mean 'beam_size'?)" in problems
    settings, problems = _run(stages=["select", "evaluate"])
    assert not problems and settings.stages == ["select", "evaluate"] and settings.evaluation.shots == [1, 2]


def test_vlm_keys_of_the_other_kind_are_refused():
    with pytest.raises(ValueError, match="icd_template: read only by kind causal_lm"):
        VlmSettings(kind="qwen2_5_vl", icd_template="{question} = {answer}")
    with pytest.raises(ValueError, match="max_pixels: read only by kind qwen2_5_vl"):
        VlmSettings(kind="causal_lm", max_pixels=1000)


def test_dataset_needs_files_or_the_demo():
    with pytest.raises(ValueError, match="train_questions: required"):
        VqaIclDatasetSettings()
    with pytest.raises(ValueError, match="root: required with generate_demo"):
        VqaIclDatasetSettings(generate_demo=True)
    with pytest.raises(ValueError, match="train_image_template: must contain"):
        VqaIclDatasetSettings(generate_demo=True, root="/tmp", train_image_template="x.jpg")
    assert VqaIclDatasetSettings(generate_demo=True, root="/tmp").val_fraction == 0.1
    defaults = VqaIclDatasetSettings(generate_demo=True, root="/tmp")
    assert (defaults.train_on, defaults.beam_score_transform) == ("all", "zscore")
    problems: list[str] = []
    from_mapping(VqaIclDatasetSettings, {"generate_demo": True, "root": "/tmp", "train_on": "top3",
                                         "beam_score_transform": "minmax"}, "datasets.lever_vqa_icl", problems)
    assert any(p.startswith("datasets.lever_vqa_icl.train_on:") for p in problems)
    assert any(p.startswith("datasets.lever_vqa_icl.beam_score_transform:") for p in problems)
