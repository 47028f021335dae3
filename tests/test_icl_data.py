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
