"""Pointer losses against values computed by hand (plain ``math``) on tiny tensors."""
from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F

from lever_plugins.modules.radi import (
    adaptive_pairwise_distillation_loss,
    cold_list_probabilities,
    listmle_loss,
    listnet_loss,
    mc_pairwise_uncertainty,
    partial_listwise_distillation_loss,
    sample_cold_positions,
    sinkhorn_margin_weights,
)
from lever_plugins.modules.ranking import (
    BeamScoreTransform,
    beam_listwise_target,
    hardest_negative_margin_loss,
    listwise_beam_kl_loss,
    masked_cross_entropy,
    masked_logits_std,
)

NEG_INF = float("-inf")


def _log_softmax(values):
    log_z = math.log(sum(math.exp(v) for v in values))
    return [v - log_z for v in values]


# ------------------------------------------------------------------ cross-entropy


def test_masked_cross_entropy_spreads_smoothing_over_available_only():
    logits = torch.tensor([[1.0, NEG_INF, 3.0]], requires_grad=True)
    available = torch.tensor([[True, False, True]])
    loss = masked_cross_entropy(logits, torch.tensor([2]), available, label_smoothing=0.2)
    lp0, lp2 = _log_softmax([1.0, 3.0])
    expected = 0.8 * -lp2 + 0.2 * -(lp0 + lp2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 1] == 0


def test_masked_cross_entropy_equals_torch_when_everything_is_available():
    logits = torch.randn(5, 7)
    labels = torch.randint(0, 7, (5,))
    for eps in (0.0, 0.1, 0.3):
        ours = masked_cross_entropy(logits, labels, None, eps)
        theirs = F.cross_entropy(logits, labels, label_smoothing=eps)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_masked_logits_std_ignores_masked_entries():
    logits = torch.tensor([[1.0, 3.0, NEG_INF], [2.0, 2.0, 2.0]])
    available = torch.isfinite(logits)
    assert masked_logits_std(logits, available).item() == pytest.approx((1.0 + 0.0) / 2)


# ------------------------------------------------------------------ V3 listwise / pairwise


def test_beam_listwise_target_and_kl_by_hand():
    # B = 1, S = 2, K = 3, labels (0, 2); beam scores 0 and ln 3 -> sigmoid 0.5 and 0.75.
    labels = torch.tensor([[0, 2]])
    beam = torch.tensor([[0.0, math.log(3.0)]])
    available = torch.tensor([[[True, True, True], [False, True, True]]])
    target = beam_listwise_target(labels, beam, available)
    torch.testing.assert_close(target, torch.tensor([[[0.5, 0.25, 0.25], [0.0, 0.25, 0.75]]]))

    logits = torch.tensor([[[1.0, 0.0, -1.0], [NEG_INF, 0.5, 1.5]]], requires_grad=True)
    lp_step0 = _log_softmax([1.0, 0.0, -1.0])
    lp_step1 = _log_softmax([0.5, 1.5])
    kl0 = sum(t * (math.log(t) - lp) for t, lp in zip([0.5, 0.25, 0.25], lp_step0))
    kl1 = sum(t * (math.log(t) - lp) for t, lp in zip([0.25, 0.75], lp_step1))
    loss = listwise_beam_kl_loss(logits, labels, beam, available)
    assert loss.item() == pytest.approx((kl0 + kl1) / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_listwise_is_zero_when_only_the_label_is_left():
    # K == S == 2: at step 1 only the label remains, the target is one-hot and the model agrees.
    labels = torch.tensor([[1, 0]])
    available = torch.tensor([[[True, True], [True, False]]])
    logits = torch.tensor([[[0.0, 0.0], [0.3, NEG_INF]]])
    beam = torch.tensor([[0.0, -5.0]])
    target = beam_listwise_target(labels, beam, available)
    torch.testing.assert_close(target[0, 1], torch.tensor([1.0, 0.0]))
    # Step 0: target (0.5, 0.5) equals the model's (0.5, 0.5) as well.
    assert listwise_beam_kl_loss(logits, labels, beam, available).item() == pytest.approx(0.0, abs=1e-7)


def test_listwise_rejects_misaligned_beam_scores():
    with pytest.raises(ValueError, match="beam_scores"):
        listwise_beam_kl_loss(torch.zeros(1, 2, 3), torch.tensor([[0, 1]]), torch.zeros(1, 3))


# ------------------------------------------------------------------ beam-score transforms


def test_zscore_transform_by_hand():
    train = torch.tensor([0.0, 0.1, 0.2, 0.5])
    mean = 0.2
    std = math.sqrt((0.2**2 + 0.1**2 + 0.0 + 0.3**2) / 4)  # population std
    transform = BeamScoreTransform("zscore", train)
    assert transform.mean == pytest.approx(mean) and transform.std == pytest.approx(std)
    out = transform(torch.tensor([[0.5, 0.0], [-1.0, 0.2]]))
    expected = [[(0.5 - mean) / std, -mean / std], [(-1.0 - mean) / std, 0.0]]
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-6, rtol=0)
    assert out.dtype == torch.float32
    # All training scores equal: std falls back to 1 (no division by zero).
    assert BeamScoreTransform("zscore", torch.full((3,), 0.7))(torch.tensor([1.7])).item() == pytest.approx(1.0)


def test_rank_transform_by_hand_with_ties_and_unseen_scores():
    # n = 4 training scores with a tie; r = #below + #equal / 2, u = (r + 1/2) / (n + 1), out = Phi^-1(u).
    transform = BeamScoreTransform("rank", torch.tensor([0.5, 0.1, 0.0, 0.1]))
    phi_inv = NormalDist().inv_cdf
    cases = {
        0.0: phi_inv(1.0 / 5),   # r = 0.5
        0.1: 0.0,                # r = 1 + 2 / 2 = 2: the median
        0.5: phi_inv(4.0 / 5),   # r = 3.5
        0.3: phi_inv(3.5 / 5),   # unseen, between 0.1 and 0.5: r = 3
        -1.0: phi_inv(0.5 / 5),  # below every training score
        9.0: phi_inv(4.5 / 5),   # above every training score
    }
    out = transform(torch.tensor(list(cases)))
    torch.testing.assert_close(out, torch.tensor(list(cases.values())), atol=1e-6, rtol=0)
    # Only the order counts: a monotone change of the training scores gives the same values.
    stretched = BeamScoreTransform("rank", torch.tensor([0.5, 0.1, 0.0, 0.1]) ** 3 * 100)
    torch.testing.assert_close(stretched(torch.tensor([0.0, 0.1, 12.5])), out[:3], atol=1e-6, rtol=0)


def test_no_transform_and_bad_transforms():
    scores = torch.tensor([[0.25, -0.5]])
    assert torch.equal(BeamScoreTransform("none")(scores), scores)
    with pytest.raises(ValueError, match="one of"):
        BeamScoreTransform("minmax", scores)
    with pytest.raises(ValueError, match="needs the training scores"):
        BeamScoreTransform("zscore", torch.zeros(0))


def _label_mass(scores):
    """V3 listwise target mass on the labelled candidate at each step of hand-built 2-step beams, K = 8."""
    batch = scores.shape[0]
    labels = torch.tensor([[0, 1]] * batch)
    available = torch.ones(batch, 2, 8, dtype=torch.bool)
    available[:, 1, 0] = False
    target = beam_listwise_target(labels, scores, available)
    return target[:, 0, 0], target[:, 1, 1]


@pytest.mark.parametrize("kind", ["zscore", "rank"])
def test_transformed_beam_scores_separate_high_and_low_steps_in_the_listwise_target(kind):
    # exp(-NLL) gains of a real VLM: first steps raise the answer's probability by ~0.05, second
    # steps add ~0.004. Raw, sigmoid puts ~0.51 and ~0.50 on the label: the same flat target.
    raw = torch.tensor([[0.05, 0.004], [0.06, 0.002], [0.04, 0.006], [0.055, 0.003], [0.045, 0.005]])
    high, low = _label_mass(raw)
    assert (high - low).abs().max() < 0.02 and (high - 0.5).abs().max() < 0.02
    transform = BeamScoreTransform(kind, raw)
    high, low = _label_mass(transform(raw))
    assert high.min() > low.max()  # every high-scoring step asks for more mass than every low one
    assert high.mean() - low.mean() > 0.3
    if kind == "zscore":
        assert (high - low).min() > 0.25 and high.min() > 0.6 and low.max() < 0.4
    else:  # ranks: the middle of the order stays near 1/2, the ends move most
        assert high.max() > 0.75 and low.min() < 0.25
    # Within a step the order of the beam scores still shows: the best first step gets the most.
    assert high.argmax() == raw[:, 0].argmax() and low.argmax() == raw[:, 1].argmax()


def test_demo_like_second_steps_are_no_longer_all_one_half():
    # The demo's beams: first steps up to 0.98, second steps near 0 (one hurts, one helps a little).
    raw = torch.tensor([[0.98, 0.003], [0.90, -0.02], [0.70, 0.04], [0.95, 0.0]])
    _, low_raw = _label_mass(raw)
    assert (low_raw - 0.5).abs().max() < 0.011  # today's target: ~0.5 on every second step
    high, low = _label_mass(BeamScoreTransform("zscore", raw)(raw))
    assert low.max() < 0.3 and high.min() > 0.6


def test_hardest_negative_margin_by_hand():
    logits = torch.tensor([[[2.0, 1.5, -1.0], [NEG_INF, 0.2, 1.0]]], requires_grad=True)
    labels = torch.tensor([[0, 1]])
    available = torch.isfinite(logits)
    # step 0: max(0, 1 + 1.5 - 2) = 0.5; step 1: max(0, 1 + 1.0 - 0.2) = 1.8
    loss = hardest_negative_margin_loss(logits, labels, available, margin=1.0)
    assert loss.item() == pytest.approx((0.5 + 1.8) / 2)
    loss.backward()
    assert logits.grad[0, 0, 2] == 0  # not the hardest negative
    assert torch.isfinite(logits.grad).all()


def test_hardest_negative_skips_steps_without_negatives():
    logits = torch.tensor([[[0.0, 0.5], [0.7, NEG_INF]]])
    labels = torch.tensor([[1, 0]])
    # step 0: max(0, 2 + 0 - 0.5) = 1.5; step 1 has no negative and is left out.
    assert hardest_negative_margin_loss(logits, labels, torch.isfinite(logits), 2.0).item() == pytest.approx(1.5)


# ------------------------------------------------------------------ RADI pairwise


def test_mc_pairwise_uncertainty_by_hand():
    probs = torch.tensor([[[0.5, 0.3, 0.2]], [[0.3, 0.5, 0.2]]])  # (T=2, N=1, K=3)
    u = mc_pairwise_uncertainty(probs)[0]
    # gaps 0-1: +0.2, -0.2 -> 0.2; 0-2: 0.3, 0.1 -> 0.1; 1-2: 0.1, 0.3 -> 0.1
    expected = torch.tensor([[0.0, 0.2, 0.1], [0.2, 0.0, 0.1], [0.1, 0.1, 0.0]])
    torch.testing.assert_close(u, expected)


def test_sinkhorn_weights_are_one_for_uniform_uncertainty():
    u = torch.full((1, 5, 5), 0.3)
    w = sinkhorn_margin_weights(u, epsilon=0.5)
    torch.testing.assert_close(w, (1 - torch.eye(5)).unsqueeze(0))


def test_sinkhorn_three_candidates_have_no_freedom():
    # Zero diagonal + equal row/column sums force every pair to 1/6 of the mass, whatever U.
    u = torch.tensor([[[0.0, 0.9, 0.1], [0.9, 0.0, 0.4], [0.1, 0.4, 0.0]]])
    torch.testing.assert_close(sinkhorn_margin_weights(u, epsilon=0.2), (1 - torch.eye(3)).unsqueeze(0))


def test_sinkhorn_four_candidates_closed_form():
    # Only pair (0, 1) is uncertain. The mean off-diagonal uncertainty is u/6, so its cost is 6 and
    # its kernel kappa = exp(-6 / eps). By symmetry P = d_i d_j K_ij with d_0 = d_1 = a, d_2 = d_3 = b;
    # P_01 = P_23 forces b = a sqrt(kappa), and row sums 1/4 give
    # W_01 = W_23 = 3 sqrt(kappa) / (sqrt(kappa) + 2), all other pairs 3 / (sqrt(kappa) + 2).
    eps = 3.0
    u = torch.zeros(1, 4, 4, dtype=torch.float64)
    u[0, 0, 1] = u[0, 1, 0] = 0.25
    w = sinkhorn_margin_weights(u, epsilon=eps, num_iters=500, tolerance=1e-12)[0]
    root = math.sqrt(math.exp(-6.0 / eps))
    uncertain, other = 3 * root / (root + 2), 3 / (root + 2)
    expected = torch.tensor(
        [[0, uncertain, other, other], [uncertain, 0, other, other], [other, other, 0, uncertain], [other, other, uncertain, 0]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(w, expected)
    assert uncertain < 1 < other  # the uncertain pair gets the smaller margin


def test_sinkhorn_ignores_unavailable_candidates():
    u = torch.rand(1, 5, 5)
    u = u + u.transpose(1, 2)
    available = torch.tensor([[True, False, True, True, True]])
    w = sinkhorn_margin_weights(u, available, epsilon=1.0, num_iters=200)[0]
    assert (w[1] == 0).all() and (w[:, 1] == 0).all()
    torch.testing.assert_close(w.sum(0)[available[0]], torch.full((4,), 3.0))  # n - 1
    torch.testing.assert_close(w.sum(1)[available[0]], torch.full((4,), 3.0))


def test_adaptive_pairwise_with_one_teacher_sample_is_the_hard_margin_loss():
    student = torch.tensor([[0.5, 2.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[3.0, 2.0, 1.0]])  # ranking 0 > 1 > 2
    # pairs (0,1): max(0, 1 - (0.5 - 2)) = 2.5; (0,2): max(0, 1 - 0.5) = 0.5; (1,2): max(0, 1 - 2) = 0
    loss = adaptive_pairwise_distillation_loss(student, teacher, margin=1.0)
    assert loss.item() == pytest.approx((2.5 + 0.5 + 0.0) / 3)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    # Candidate 1 unavailable: only the pair (0, 2) remains.
    available = torch.tensor([[True, False, True]])
    masked_student = student.detach().clone()
    masked_student[0, 1] = NEG_INF
    assert adaptive_pairwise_distillation_loss(masked_student, teacher, available).item() == pytest.approx(0.5)


def test_adaptive_pairwise_top_k_keeps_pairs_led_by_the_teacher_top_k():
    student = torch.tensor([[0.5, 2.0, 0.0]])
    teacher = torch.tensor([[3.0, 2.0, 1.0]])
    # top-1 (candidate 0) leads pairs (0,1) and (0,2) only: (2.5 + 0.5) / 2
    assert adaptive_pairwise_distillation_loss(student, teacher, top_k=1).item() == pytest.approx(1.5)
    assert adaptive_pairwise_distillation_loss(student, teacher, top_k=3).item() == pytest.approx(1.0)


@pytest.mark.parametrize("top_k", [None, 2])
def test_adaptive_margins_average_to_the_base_margin(top_k):
    # Equal student scores make every hinge active with value M_ij, so the loss is the mean margin,
    # which the rescaling pins to `margin` whatever the (non-uniform) MC uncertainty.
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 4, 7, generator=gen) * 3
    student = torch.zeros(4, 7)
    loss = adaptive_pairwise_distillation_loss(student, teacher, margin=0.7, epsilon=0.3, top_k=top_k)
    assert loss.item() == pytest.approx(0.7, rel=1e-5)


def test_adaptive_pairwise_accepts_mc_samples():
    student = torch.randn(3, 6, requires_grad=True)
    teacher = torch.randn(5, 3, 6)
    loss = adaptive_pairwise_distillation_loss(student, teacher, margin=0.5, epsilon=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    with pytest.raises(ValueError, match="teacher_logits"):
        adaptive_pairwise_distillation_loss(student, torch.randn(3, 5))


def test_adaptive_pairwise_in_probability_space_by_hand():
    # Seed 003: max{0, m - (p_s(a_i) - p_s(a_j))} on the student's probabilities.
    student = torch.tensor([[0.0, math.log(2.0), 0.0]], requires_grad=True)  # p_s = (1/4, 1/2, 1/4)
    teacher = torch.tensor([[3.0, 2.0, 1.0]])  # ranking 0 > 1 > 2, one sample: W = 1
    # probs, m = 0.5: (0,1): 0.5 - (1/4 - 1/2) = 0.75; (0,2): 0.5 - 0 = 0.5; (1,2): 0.5 - 1/4 = 0.25
    loss = adaptive_pairwise_distillation_loss(student, teacher, margin=0.5, space="probs")
    assert loss.item() == pytest.approx((0.75 + 0.5 + 0.25) / 3)
    # logits, m = 0.5: (0,1): 0.5 + ln 2; (0,2): 0.5; (1,2): max(0, 0.5 - ln 2) = 0
    logit_loss = adaptive_pairwise_distillation_loss(student, teacher, margin=0.5, space="logits")
    assert logit_loss.item() == pytest.approx((0.5 + math.log(2.0) + 0.5 + 0.0) / 3)
    assert adaptive_pairwise_distillation_loss(student, teacher, margin=0.5).item() == logit_loss.item()  # default
    # Gradient of the prob-space loss: d/dz of -(p0 - p1) - (p0 - p2) - (p1 - p2) over 3 pairs
    # = -(2 p0 + 0 p1 - 2 p2)' / 3 with dp_i/dz_k = p_i (1[i=k] - p_k).
    loss.backward()
    p = [0.25, 0.5, 0.25]
    coef = [2.0, 0.0, -2.0]  # the loss is const - (2 p0 - 2 p2) / 3
    expected = [-sum(c * p[i] * ((i == k) - p[k]) for i, c in enumerate(coef)) / 3 for k in range(3)]
    torch.testing.assert_close(student.grad, torch.tensor([expected]), atol=1e-6, rtol=0)


def test_adaptive_pairwise_probability_space_masks_and_top_k_by_hand():
    student = torch.tensor([[0.0, 5.0, math.log(3.0), NEG_INF]])  # candidate 1 and 3 unavailable
    available = torch.tensor([[True, False, True, False]])
    teacher = torch.tensor([[1.0, 9.0, 0.0, 9.0]])  # over the available ones: 0 > 2
    # p_s over {0, 2} = (1/4, 3/4); one pair (0, 2): max(0, 1 - (1/4 - 3/4)) = 1.5
    assert adaptive_pairwise_distillation_loss(student, teacher, available, space="probs").item() == pytest.approx(1.5)
    full = torch.tensor([[math.log(4.0), math.log(3.0), math.log(2.0), 0.0]])  # p_s = (.4, .3, .2, .1)
    teacher = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    # top_k = 1: pairs (0, j), j = 1..3, m = 0.2: max(0, .2 - .1) + max(0, .2 - .2) + max(0, .2 - .3) = 0.1
    loss = adaptive_pairwise_distillation_loss(full, teacher, margin=0.2, top_k=1, space="probs")
    assert loss.item() == pytest.approx(0.1 / 3)
    with pytest.raises(ValueError, match="space"):
        adaptive_pairwise_distillation_loss(full, teacher, space="ranks")


def test_adaptive_pairwise_probability_space_is_the_logit_form_on_probabilities():
    # With MC samples (non-uniform adaptive margins) the two forms differ only in what the hinge
    # compares: the probability form equals the logit form applied to the student's softmax.
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(5, 3, 6, generator=gen) * 2
    student = torch.randn(3, 6, generator=gen)
    available = torch.ones(3, 6, dtype=torch.bool)
    available[1, 2] = available[2, 0] = False
    probs = torch.softmax(student.masked_fill(~available, NEG_INF), -1)
    for top_k in (None, 2):
        as_probs = adaptive_pairwise_distillation_loss(student, teacher, available, margin=0.3, epsilon=0.5, top_k=top_k, space="probs")
        on_softmax = adaptive_pairwise_distillation_loss(probs, teacher, available, margin=0.3, epsilon=0.5, top_k=top_k)
        assert as_probs.item() == pytest.approx(on_softmax.item(), rel=1e-6)
        as_logits = adaptive_pairwise_distillation_loss(student, teacher, available, margin=0.3, epsilon=0.5, top_k=top_k)
        assert as_logits.item() != pytest.approx(as_probs.item(), rel=1e-3)


# ------------------------------------------------------------------ RADI listwise


def test_listnet_by_hand():
    student = torch.tensor([[1.0, 2.0, 9.0]])
    teacher = torch.tensor([[0.0, math.log(3.0), 9.0]])
    valid = torch.tensor([[True, True, False]])
    lp = _log_softmax([1.0, 2.0])
    assert listnet_loss(student, teacher, valid).item() == pytest.approx(-(0.25 * lp[0] + 0.75 * lp[1]), rel=1e-6)


def test_listmle_by_hand():
    e = math.e
    full = (math.log(e**2 + e + 1) - 2) + (math.log(e + 1) - 1) + 0.0
    assert listmle_loss(torch.tensor([[2.0, 1.0, 0.0]])).item() == pytest.approx(full, rel=1e-6)
    valid = torch.tensor([[True, False, True]])
    skipped = math.log(e**2 + 1) - 2
    assert listmle_loss(torch.tensor([[2.0, 7.0, 0.0]]), valid).item() == pytest.approx(skipped, rel=1e-6)


def test_cold_list_probabilities():
    torch.testing.assert_close(
        cold_list_probabilities(3, "zipf", 1.0), torch.tensor([6 / 11, 3 / 11, 2 / 11], dtype=torch.float64)
    )
    z = math.exp(-1) + math.exp(-2) + math.exp(-3)
    expected = torch.tensor([math.exp(-1) / z, math.exp(-2) / z, math.exp(-3) / z], dtype=torch.float64)
    torch.testing.assert_close(cold_list_probabilities(3, "exponential", 1.0), expected)
    with pytest.raises(ValueError, match="sampling"):
        cold_list_probabilities(3, "uniform", 1.0)


def test_cold_sampling_frequencies_follow_zipf():
    gen = torch.Generator().manual_seed(0)
    n = torch.full((20000,), 5)
    ranks, valid = sample_cold_positions(n, 1, "zipf", 1.0, 5, gen)
    assert valid.all()
    freq = torch.bincount(ranks[:, 0], minlength=5).double() / 20000
    harmonic = sum(1 / k for k in range(1, 6))
    torch.testing.assert_close(freq, torch.tensor([1 / k / harmonic for k in range(1, 6)], dtype=torch.float64), atol=0.015, rtol=0)


def test_cold_sampling_without_replacement_and_short_rows():
    gen = torch.Generator().manual_seed(1)
    n = torch.tensor([6, 2, 0])
    ranks, valid = sample_cold_positions(n, 3, "exponential", 0.5, 6, gen)
    assert valid.tolist() == [[True, True, True], [True, True, False], [False, False, False]]
    assert len(set(ranks[0].tolist())) == 3 and ranks[0].tolist() == sorted(ranks[0].tolist())
    assert (ranks[0] < 6).all() and sorted(ranks[1, :2].tolist()) == [0, 1]


def test_partial_listwise_hot_list_only_is_listnet_on_teacher_top_k():
    student = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    teacher = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    loss = partial_listwise_distillation_loss(student, teacher, hot_k=2, cold_k=0, list_loss="listnet")
    # list = candidates (0, 1); teacher probs renormalised: e^4 : e^3 -> (e, 1) / (e + 1)
    t0, t1 = math.e / (math.e + 1), 1 / (math.e + 1)
    lp = _log_softmax([0.0, 1.0])
    assert loss.item() == pytest.approx(-(t0 * lp[0] + t1 * lp[1]), rel=1e-6)


def test_partial_listwise_listmle_over_whole_available_list():
    # Cold list larger than the rest: the list is every available candidate in teacher order.
    student = torch.tensor([[0.0, 1.0, 5.0, 3.0]], requires_grad=True)
    teacher = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    available = torch.tensor([[True, True, False, True]])
    loss = partial_listwise_distillation_loss(
        student, teacher, available, hot_k=1, cold_k=5, list_loss="listmle", generator=torch.Generator().manual_seed(0)
    )
    # teacher order (0, 1, 3) with student scores (0, 1, 3)
    expected = (math.log(1 + math.e + math.e**3) - 0) + (math.log(math.e + math.e**3) - 1) + 0.0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert student.grad[0, 2] == 0 and torch.isfinite(student.grad).all()


def test_partial_listwise_cold_list_is_drawn_from_the_tail_with_exponential_weights():
    # Hot list = candidate 0; one cold candidate j in 1..5 with P(j) ∝ exp(-alpha j) (its rank in the
    # tail). With student scores s_j = j, ListMLE of the list (0, j) is log(1 + e^j) - 0, so the
    # batch mean estimates sum_j P(j) log(1 + e^j).
    rows, alpha = 20000, 0.7
    student = torch.arange(6.0).expand(rows, 6)
    teacher = torch.arange(6.0, 0.0, -1.0).expand(rows, 6)
    gen = torch.Generator().manual_seed(0)
    loss = partial_listwise_distillation_loss(
        student, teacher, hot_k=1, cold_k=1, sampling="exponential", alpha=alpha, list_loss="listmle", generator=gen
    )
    weights = [math.exp(-alpha * j) for j in range(1, 6)]
    expected = sum(w * math.log(1 + math.exp(j)) for w, j in zip(weights, range(1, 6))) / sum(weights)
    assert loss.item() == pytest.approx(expected, rel=0.01)
    with pytest.raises(ValueError, match="hot_k"):
        partial_listwise_distillation_loss(student, teacher, hot_k=0)
