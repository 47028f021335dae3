"""Retrieval metrics on hand-built similarity matrices (ranks worked out by hand in the comments)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lever_plugins.metrics import coco_1k_5fold_metrics, retrieval_metrics

KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def test_two_images_four_captions_by_hand():
    sims = np.array(
        [
            [0.9, 0.1, 0.5, 0.2],  # image 0 owns captions 0, 1: best own 0.9, no other caption >= 0.9 -> rank 0
            [0.3, 0.8, 0.7, 0.6],  # image 1 owns captions 2, 3: best own 0.7, caption 1 (0.8) beats it -> rank 1
        ]
    )
    txt2img = np.array([0, 0, 1, 1])
    # t2i: caption 0 -> image 0 (0.9 > 0.3) rank 0; caption 1 -> image 0 (0.1 < 0.8) rank 1;
    # caption 2 -> image 1 (0.7 > 0.5) rank 0; caption 3 -> image 1 (0.6 > 0.2) rank 0.
    m = retrieval_metrics(sims, txt2img)
    assert m["i2t_r1"] == pytest.approx(50.0)
    assert m["i2t_r5"] == m["i2t_r10"] == pytest.approx(100.0)
    assert m["t2i_r1"] == pytest.approx(75.0)
    assert m["t2i_r5"] == m["t2i_r10"] == pytest.approx(100.0)
    assert m["rsum"] == pytest.approx(525.0)


def test_recall_at_5_and_10_on_a_cyclic_matrix():
    # sims[i, j] = (i + j) mod 12, caption j belongs to image j. Column j is a permutation of 0..11 and
    # the truth scores (2j mod 12), so 11 - (2j mod 12) images beat it: ranks 11,9,7,5,3,1,11,9,7,5,3,1.
    # R@1: none; R@5 (rank < 5): 3,1,3,1 -> 4 of 12; R@10: all but the two 11s -> 10 of 12.
    # The matrix is symmetric, so i2t equals t2i.
    n = 12
    sims = (np.arange(n)[:, None] + np.arange(n)[None, :]) % n
    m = retrieval_metrics(sims.astype(float), np.arange(n))
    for prefix in ("i2t", "t2i"):
        assert m[f"{prefix}_r1"] == pytest.approx(0.0)
        assert m[f"{prefix}_r5"] == pytest.approx(100 * 4 / 12)
        assert m[f"{prefix}_r10"] == pytest.approx(100 * 10 / 12)
    assert m["rsum"] == pytest.approx(2 * 100 * 14 / 12)


def test_i2t_uses_the_best_of_the_image_captions():
    # Image 0's captions 0 and 1: caption 1 is ranked first overall, caption 0 last -> rank 0 (best one).
    sims = np.array([[0.0, 0.9, 0.5], [0.8, 0.1, 0.7]])
    m = retrieval_metrics(sims, [0, 0, 1])
    # image 1 owns caption 2 (0.7) but caption 0 scores 0.8 -> rank 1.
    assert m["i2t_r1"] == pytest.approx(50.0)


def test_ties_count_against_the_query():
    sims = np.full((3, 6), 0.5)
    m = retrieval_metrics(sims, [0, 0, 1, 1, 2, 2])
    # Every other candidate ties with the truth: i2t rank 4 (four captions of other images), t2i rank 2.
    assert m["i2t_r1"] == 0.0 and m["i2t_r5"] == 100.0
    assert m["t2i_r1"] == 0.0 and m["t2i_r5"] == 100.0


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(0)
    sims = rng.normal(size=(7, 21))
    ids = np.repeat(np.arange(7), 3)
    expected = retrieval_metrics(sims, ids)
    assert retrieval_metrics(torch.from_numpy(sims).float(), torch.from_numpy(ids)) == pytest.approx(expected)
    assert retrieval_metrics(torch.from_numpy(sims).requires_grad_(), ids.tolist()) == pytest.approx(expected)


def test_perfect_scores_give_rsum_600():
    ids = np.repeat(np.arange(4), 5)
    sims = (ids[None, :] == np.arange(4)[:, None]).astype(float)
    assert retrieval_metrics(sims, ids)["rsum"] == pytest.approx(600.0)


def test_folds_rank_only_within_the_fold():
    # Folds of two images (n_folds=2). Fold A (images 0, 1, captions 0, 1) is perfect; fold B
    # (images 2, 3, captions 2, 3): image 2 prefers caption 3 (0.5 > 0.4) -> i2t rank 1, caption 3
    # prefers image 2 (0.5 > 0.3) -> t2i rank 1; everything else rank 0 -> R@1 50 in fold B.
    # Cross-fold entries (0.9) would hurt in the full ranking but must be ignored by the folds.
    sims = np.array(
        [
            [0.5, 0.1, 0.9, 0.0],
            [0.2, 0.6, 0.0, 0.0],
            [0.0, 0.0, 0.4, 0.5],
            [0.9, 0.0, 0.0, 0.3],
        ]
    )
    ids = np.arange(4)
    folds = coco_1k_5fold_metrics(sims, ids, n_folds=2)
    assert folds["i2t_r1"] == pytest.approx((100 + 50) / 2)
    assert folds["t2i_r1"] == pytest.approx((100 + 50) / 2)
    assert folds["rsum"] == pytest.approx((600 + 500) / 2)
    full = retrieval_metrics(sims, ids)
    # Full ranking: image 0 loses to caption 2 (0.9), image 3 to caption 0 (0.9), image 2 to caption 3.
    assert full["i2t_r1"] == pytest.approx(25.0)


def test_folds_follow_captions_in_any_order():
    rng = np.random.default_rng(1)
    ids = np.repeat(np.arange(10), 5)
    sims = rng.normal(size=(10, 50))
    order = rng.permutation(50)
    assert coco_1k_5fold_metrics(sims[:, order], ids[order]) == pytest.approx(coco_1k_5fold_metrics(sims, ids))
    one_fold = coco_1k_5fold_metrics(sims, ids, n_folds=1)
    assert one_fold == pytest.approx(retrieval_metrics(sims, ids))


@pytest.mark.parametrize(
    "sims, ids, message",
    [
        (np.zeros((2, 3)), [0, 0], "txt2img must be"),
        (np.zeros((2, 3)), [0, 1, 2], "not an image index"),
        (np.zeros((3, 3)), [0, 0, 1], "image 2 has no caption"),
        (np.array([[0.0, np.nan], [0.0, 0.0]]), [0, 1], "non-finite"),
        (np.zeros(3), [0, 0, 0], "matrix"),
    ],
)
def test_bad_input_is_rejected(sims, ids, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(sims, ids)


def test_folds_must_divide_the_images():
    with pytest.raises(ValueError, match="equal folds"):
        coco_1k_5fold_metrics(np.zeros((6, 6)), np.arange(6), n_folds=4)
    with pytest.raises(ValueError, match="n_folds"):
        coco_1k_5fold_metrics(np.zeros((6, 6)), np.arange(6), n_folds=0)
