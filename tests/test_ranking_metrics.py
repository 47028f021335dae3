"""Ranking metrics on hand-built score tables (numpy and torch inputs)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lever_plugins.metrics.ranking import (
    mrr,
    ndcg_at_k,
    pointer_selection_metrics,
    target_ranks,
    topk_accuracy,
)

# Row 0: target 2 ranks 0th. Row 1: target 0 ranks 2nd (two higher). Row 2: target 3 ranks 1st.
SCORES = np.array(
    [
        [0.1, 0.2, 0.9, 0.3],
        [0.2, 0.5, 0.7, 0.1],
        [0.4, 0.9, 0.0, 0.6],
    ]
)
TARGET = np.array([2, 0, 3])


def test_ranks_and_topk_accuracy_in_percent():
    assert target_ranks(SCORES, TARGET).tolist() == [0, 2, 1]
    assert topk_accuracy(SCORES, TARGET, 1) == pytest.approx(100 / 3)
    assert topk_accuracy(SCORES, TARGET, 2) == pytest.approx(200 / 3)
    assert topk_accuracy(SCORES, TARGET, 3) == pytest.approx(100.0)
    assert topk_accuracy(SCORES, TARGET, 10) == pytest.approx(100.0)


def test_mrr():
    assert mrr(SCORES, TARGET) == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)


def test_torch_and_numpy_inputs_agree():
    as_torch = torch.tensor(SCORES, dtype=torch.float32), torch.tensor(TARGET)
    assert topk_accuracy(*as_torch, k=2) == pytest.approx(topk_accuracy(SCORES, TARGET, 2))
    assert mrr(*as_torch) == pytest.approx(mrr(SCORES, TARGET))


def test_ties_count_against_the_target():
    flat = np.zeros((2, 5))
    assert topk_accuracy(flat, np.array([0, 4]), 1) == 0.0
    assert topk_accuracy(flat, np.array([0, 4]), 5) == 100.0
    assert mrr(flat, np.array([0, 4])) == pytest.approx(1 / 5)


def test_minus_inf_ranks_last_and_nan_is_rejected():
    scores = np.array([[-np.inf, 1.0, 0.5]])
    assert target_ranks(scores, np.array([0])).tolist() == [2]
    with pytest.raises(ValueError, match="NaN"):
        mrr(np.array([[np.nan, 1.0]]), np.array([1]))


@pytest.mark.parametrize(
    "scores, target, k, match",
    [
        (np.zeros((2, 3)), np.array([0, 3]), 1, r"\[0, 3\)"),
        (np.zeros((2, 3)), np.array([0]), 1, "shape"),
        (np.zeros((2, 3)), np.array([0.0, 1.0]), 1, "integer"),
        (np.zeros(3), np.array([0]), 1, "shape"),
        (np.zeros((2, 3)), np.array([0, 1]), 0, "k must"),
    ],
)
def test_bad_inputs(scores, target, k, match):
    with pytest.raises(ValueError, match=match):
        topk_accuracy(scores, target, k)


def _dcg(gains):
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains))


def test_ndcg_hand_computed():
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    relevance = np.array([[0.0, 3.0, 2.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    # Row 0 ranks relevances [0, 3, 2, 1]; ideal [3, 2, 1, 0]. Row 1 ranks [0, 0, 0, 1]; ideal [1, 0, 0, 0].
    row0_k3 = _dcg([0, 3, 2]) / _dcg([3, 2, 1])
    row1_k3 = 0.0
    assert ndcg_at_k(scores, relevance, 3) == pytest.approx((row0_k3 + row1_k3) / 2)
    row1_k4 = _dcg([0, 0, 0, 1]) / _dcg([1])
    assert ndcg_at_k(scores, relevance, 4) == pytest.approx((_dcg([0, 3, 2, 1]) / _dcg([3, 2, 1]) + row1_k4) / 2)


def test_ndcg_perfect_ranking_is_one_and_rows_without_relevance_are_skipped():
    relevance = np.array([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    assert ndcg_at_k(scores, relevance, 2) == pytest.approx(1.0)
    assert math.isnan(ndcg_at_k(scores[1:], relevance[1:], 2))
    with pytest.raises(ValueError, match="non-negative"):
        ndcg_at_k(scores, -relevance, 2)


def test_pointer_selection_metrics_on_teacher_forced_logits():
    # B = 1, S = 2, K = 3; label sequence (1, 2). Step 0 ranks 1 first; step 1 (1 masked) ranks 0 above 2.
    logits = torch.tensor([[[0.0, 2.0, 1.0], [5.0, float("-inf"), 1.0]]])
    labels = torch.tensor([[1, 2]])
    out = pointer_selection_metrics(logits, labels, ks=(1, 2), ndcg_k=2)
    assert out["top1"] == pytest.approx(50.0)
    assert out["top2"] == pytest.approx(100.0)
    assert out["mrr"] == pytest.approx((1 + 1 / 2) / 2)
    # Step-0 ranking by score: [1, 2, 0] with relevance S - s: label 1 -> 2, label 2 -> 1, so ideal.
    assert out["ndcg@2"] == pytest.approx(1.0)
