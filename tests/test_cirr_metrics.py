"""CIRR metrics and test-server export on hand-built similarity matrices."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lever_plugins.metrics.cir import cirr_metrics, cirr_submission, recall_at_k, write_cirr_submission

GALLERY = ["a", "b", "c", "d", "e", "f", "g"]
#                    a     b     c     d     e     f     g
SIMS = torch.tensor([
    [0.90, 0.10, 0.80, 0.20, 0.30, 0.00, 0.05],  # q0: ref a (top-1 overall), target c
    [0.50, 0.90, 0.70, 0.60, 0.10, 0.20, 0.95],  # q1: ref b, target d; g is no member
    [0.10, 0.20, 0.90, 0.40, 0.50, 0.60, 0.05],  # q2: ref c, target g (last)
])
REFERENCES = ["a", "b", "c"]
TARGETS = ["c", "d", "g"]
MEMBERS = [
    ["a", "b", "c", "d", "e", "f"],
    ["b", "c", "d", "e", "a", "f"],
    ["c", "g", "a", "b", "d", "e"],
]
# By hand: global ranks (reference removed) 0, 2 (g, c ahead), 5 (a, b, d, e, f ahead);
# subset ranks 0, 1 (only c ahead: g is not a member, b is the reference), 4.


def test_hand_built_recalls():
    metrics = cirr_metrics(SIMS, REFERENCES, TARGETS, GALLERY, MEMBERS)
    third = 100.0 / 3.0
    expected = {
        "recall_at1": third,
        "recall_at5": 2 * third,
        "recall_at10": 100.0,
        "recall_at50": 100.0,
        "recall_subset_at1": third,
        "recall_subset_at2": 2 * third,
        "recall_subset_at3": 2 * third,
        "r5_rs1_mean": 50.0,
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key


def test_own_reference_at_top_does_not_count():
    # The reference b scores highest; without removing it the target c would rank second.
    sims = torch.tensor([[0.2, 1.0, 0.9]])
    metrics = cirr_metrics(sims, ["b"], ["c"], ["a", "b", "c"], [["a", "b", "c"]])
    assert metrics["recall_at1"] == 100.0
    assert metrics["recall_subset_at1"] == 100.0
    # A non-reference image above the target still counts against it.
    sims = torch.tensor([[0.95, 1.0, 0.9]])
    metrics = cirr_metrics(sims, ["b"], ["c"], ["a", "b", "c"], [["a", "b", "c"]])
    assert metrics["recall_at1"] == 0.0
    assert metrics["recall_at5"] == 100.0


def test_subset_excludes_reference_and_non_members():
    # Non-member x and reference r both outscore target t; within members only y (below t) competes.
    gallery = ["r", "t", "x", "y"]
    sims = torch.tensor([[0.9, 0.5, 0.8, 0.1]])
    metrics = cirr_metrics(sims, ["r"], ["t"], gallery, [["r", "t", "y"]])
    assert metrics["recall_at1"] == 0.0
    assert metrics["recall_subset_at1"] == 100.0
    # Once y outscores t, the subset rank becomes 1.
    sims = torch.tensor([[0.9, 0.5, 0.8, 0.6]])
    metrics = cirr_metrics(sims, ["r"], ["t"], gallery, [["r", "t", "y"]])
    assert metrics["recall_subset_at1"] == 0.0
    assert metrics["recall_subset_at2"] == 100.0


def test_numpy_and_torch_agree():
    from_torch = cirr_metrics(SIMS, REFERENCES, TARGETS, GALLERY, MEMBERS)
    from_numpy = cirr_metrics(SIMS.numpy().astype(np.float64), REFERENCES, TARGETS, GALLERY, MEMBERS)
    assert from_torch == from_numpy


def _brute_force_ranks(sims, references, targets, gallery, members):
    """Independent per-query reference: sort names, ties by gallery position."""
    global_ranks, subset_ranks = [], []
    position = {name: j for j, name in enumerate(gallery)}
    for q, row in enumerate(sims.tolist()):
        ordered = sorted(
            (name for name in gallery if name != references[q]), key=lambda n: (-row[position[n]], position[n])
        )
        global_ranks.append(ordered.index(targets[q]))
        subset = [n for n in ordered if n in set(members[q])]
        subset_ranks.append(subset.index(targets[q]))
    return global_ranks, subset_ranks


def test_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    gallery = [f"img{j}" for j in range(60)]
    num_queries = 40
    sims = torch.from_numpy(rng.integers(0, 4, size=(num_queries, len(gallery))).astype(np.float32))
    references, targets, members = [], [], []
    for _ in range(num_queries):
        group = list(rng.choice(gallery, size=6, replace=False))
        references.append(group[0])
        targets.append(group[int(rng.integers(1, 6))])
        members.append(group)
    global_ranks, subset_ranks = _brute_force_ranks(sims, references, targets, gallery, members)
    metrics = cirr_metrics(sims, references, targets, gallery, members)
    for k in (1, 5, 10, 50):
        assert metrics[f"recall_at{k}"] == pytest.approx(recall_at_k(np.array(global_ranks), k))
    for k in (1, 2, 3):
        assert metrics[f"recall_subset_at{k}"] == pytest.approx(recall_at_k(np.array(subset_ranks), k))
    # The export ranks the same way: the target's position in each list is its rank.
    recall, recall_subset = cirr_submission(sims, list(range(num_queries)), references, gallery, members)
    for q in range(num_queries):
        ranked = recall[str(q)]
        if global_ranks[q] < 50:
            assert ranked.index(targets[q]) == global_ranks[q]
        if subset_ranks[q] < 3:
            assert recall_subset[str(q)].index(targets[q]) == subset_ranks[q]


def test_recall_at_k_values_and_errors():
    assert recall_at_k(torch.tensor([0, 1, 2, 9]), 2) == 50.0
    assert recall_at_k(np.array([3, 3]), 1) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="empty"):
        recall_at_k(torch.tensor([], dtype=torch.long), 1)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(targets=["c", "d", "zz"]), "not in the gallery"),
        (dict(targets=["a", "d", "g"]), "its own reference"),
        (dict(members=[["a", "b", "d", "e", "f", "g"]] + MEMBERS[1:]), "not among its group members"),
        (dict(members=[["a", "b", "c", "nope"]] + MEMBERS[1:]), "group member 'nope'"),
        (dict(gallery=GALLERY[:-1] + ["a"]), "appears twice"),
        (dict(sims=SIMS[:, :5]), "shape"),
        (dict(sims=torch.where(SIMS > 0.85, float("nan"), SIMS)), "NaN"),
        (dict(targets=TARGETS[:2]), "target_names has 2 entries"),
    ],
)
def test_bad_input_raises(change, message):
    args = dict(sims=SIMS, references=REFERENCES, targets=TARGETS, gallery=GALLERY, members=MEMBERS)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        cirr_metrics(args["sims"], args["references"], args["targets"], args["gallery"], args["members"])


def test_submission_format_by_hand():
    recall, recall_subset = cirr_submission(SIMS, [7, 11, 42], REFERENCES, GALLERY, MEMBERS)
    assert recall["version"] == "rc2" and recall["metric"] == "recall"
    assert recall_subset["version"] == "rc2" and recall_subset["metric"] == "recall_subset"
    assert set(recall) == {"version", "metric", "7", "11", "42"}
    # q0 without its reference a: c .8, e .3, d .2, b .1, g .05, f 0
    assert recall["7"] == ["c", "e", "d", "b", "g", "f"]
    assert recall_subset["7"] == ["c", "e", "d"]
    # q1 without b: g .95, c .7, d .6, a .5, f .2, e .1; subset has no g
    assert recall["11"] == ["g", "c", "d", "a", "f", "e"]
    assert recall_subset["11"] == ["c", "d", "a"]
    assert all("c" not in names for names in (recall["42"], recall_subset["42"]))


def test_submission_keeps_top_50_of_a_large_gallery():
    gallery = [f"img{j}" for j in range(120)]
    sims = torch.arange(120, dtype=torch.float32).flip(0).unsqueeze(0)  # img0 best, img119 worst
    recall, recall_subset = cirr_submission(sims, [5], ["img3"], gallery, [gallery[:6]])
    expected = [f"img{j}" for j in range(51) if j != 3]
    assert recall["5"] == expected
    assert recall_subset["5"] == ["img0", "img1", "img2"]


def test_write_submission_is_complete_json(tmp_path):
    recall_path, subset_path = write_cirr_submission(
        tmp_path / "out", SIMS, [7, 11, 42], REFERENCES, GALLERY, MEMBERS, name="test1"
    )
    assert recall_path.name == "recall_submission_test1.json"
    assert subset_path.name == "recall_subset_submission_test1.json"
    assert json.loads(recall_path.read_text())["metric"] == "recall"
    assert json.loads(subset_path.read_text())["11"] == ["c", "d", "a"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([recall_path.name, subset_path.name])


def test_duplicate_pair_ids_rejected():
    with pytest.raises(ValueError, match="distinct"):
        cirr_submission(SIMS, [1, 1, 2], REFERENCES, GALLERY, MEMBERS)


def test_reference_outside_the_gallery_removes_nothing():
    sims = torch.tensor([[0.9, 0.8, 0.1]])
    metrics = cirr_metrics(sims, ["elsewhere"], ["b"], ["a", "b", "c"], [["elsewhere", "a", "b"]])
    assert metrics["recall_at1"] == 0.0 and metrics["recall_at5"] == 100.0
    assert metrics["recall_subset_at1"] == 0.0  # a is a member and outscores b
