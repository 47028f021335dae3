"""SEPS head: the keep decisions decide what training keeps; evaluation keeps the budget."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _seps_reference import per_caption_loop_similarity

from lever_plugins import CrossSparseAggrNet, SEPSLoss
from lever_plugins.modules import seps_selection
from lever_plugins.schemas.seps import SepsHeadSettings
from _seps_helpers import C, CONFIG_IDS, CONFIGS, N, make_batch, make_head

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


# ---------------------------------------------------------------- keep decisions decide


def _sparse_dense(mask, dual):
    """``(D_s, D_d)`` from a training score mask (tuple when dual, else ``(D_s + D_d) / 2``: not separable)."""
    return mask if dual else (mask, None)


def _record_keeps(head, monkeypatch):
    """Record the ``keep`` argument of every ``_selection_weights`` call: what the forward actually keeps."""
    calls = []
    original = head._selection_weights

    def recording(score, logits, keep):
        calls.append(keep.detach().clone())
        return original(score, logits, keep)

    monkeypatch.setattr(head, "_selection_weights", recording)
    return calls


def _shift_offsets(head, sparse, dense):
    with torch.no_grad():
        head.sparse_keep_threshold.fill_(sparse)
        head.dense_keep_threshold.fill_(dense)


def test_policy_softmax_is_the_masked_softmax_with_the_gradients_of_its_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 4, 9, generator=g, dtype=torch.float64)  # per-image logits broadcast over captions
    policy = (torch.rand(3, 5, 1, 9, generator=g) > 0.4).double()
    # Every row's largest logit is kept (so no masked-out logit is clamped and the plain formula applies).
    row_max = F.one_hot(x.argmax(dim=-1), 9).amax(dim=-2, keepdim=True).double()  # (3, 1, 1, 9)
    policy = torch.maximum(policy, row_max)
    x.requires_grad_(True)
    policy.requires_grad_(True)
    out = seps_selection.policy_softmax(x, policy)
    masked = torch.where(policy.detach().bool(), x, float("-inf")).softmax(dim=-1)
    assert torch.allclose(out, masked, atol=1e-12)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream).sum(), (x, policy))
    weights = policy * torch.exp(x)
    plain = weights / weights.sum(dim=-1, keepdim=True)
    expected = torch.autograd.grad((plain * upstream).sum(), (x, policy))
    for got, want in zip(grads, expected):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("paper, dual", CONFIGS, ids=CONFIG_IDS)
def test_ratio_loss_alone_moves_the_kept_fraction_and_the_training_similarities(paper, dual):
    """Would fail on a head whose decisions are a threshold beside a fixed top-k: there the similarities never move."""
    torch.manual_seed(0)
    head = make_head(paper, dual).train()
    batch = make_batch(6, 6)
    criterion = SEPSLoss(target_ratio=0.25)  # the decisions start at the budget, 0.5
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    with torch.no_grad():
        sims_before, mask = head(*batch)
    kept_before = [m.mean().item() for m in (mask if dual else (mask,))]
    for _ in range(5):
        _, mask = head(*batch)
        optimizer.zero_grad()
        criterion.ratio_loss(mask).backward()
        optimizer.step()
    with torch.no_grad():
        sims_after, mask = head(*batch)
    kept_after = [m.mean().item() for m in (mask if dual else (mask,))]
    for before, after in zip(kept_before, kept_after):
        assert before == pytest.approx(0.5)
        assert abs(after - 0.25) < 0.5 * abs(before - 0.25), (kept_before, kept_after)
    assert not torch.allclose(sims_after, sims_before, atol=1e-4)
    if not paper:
        # Public-code scores: the ratio term trained only the offsets, and evaluation keeps the budget.
        head.eval()
        with torch.no_grad():
            assert torch.allclose(head(*batch), sims_before, atol=1e-6)


@pytest.mark.parametrize("has_cls", [True, False])
@pytest.mark.parametrize("paper, dual", CONFIGS, ids=CONFIG_IDS)
def test_training_keeps_exactly_the_patches_the_decisions_mark(paper, dual, has_cls):
    head = make_head(paper, dual, has_cls=has_cls, pair_chunk_size=8).train()
    _shift_offsets(head, 0.03, -0.04)  # decisions away from the budget: fewer sparse, more dense patches
    batch = make_batch(6, 9, has_cls=has_cls)
    with torch.no_grad():
        sims, mask = head(*batch)
        sparse, dense = _sparse_dense(mask, dual)
        counts = sparse.sum(dim=-1)
        assert counts.unique().numel() > 1 and (counts != head.settings.num_keep).any()  # a count per pair
        if dual:
            assert (dense.sum(dim=-1) > head.settings.num_keep).any()
            loop = per_caption_loop_similarity(head, *batch, keep=(sparse, dense))
            assert torch.allclose(sims, loop, atol=1e-5)
        sims_sparse, sparse_only = head(*batch[:3])
        loop_sparse = per_caption_loop_similarity(head, *batch[:3], keep=(sparse_only, None))
        assert torch.allclose(sims_sparse, loop_sparse, atol=1e-5)


@pytest.mark.parametrize("paper, dual", CONFIGS, ids=CONFIG_IDS)
def test_returned_decisions_are_the_fraction_actually_kept(paper, dual, monkeypatch):
    head = make_head(paper, dual, pair_chunk_size=8).train()
    _shift_offsets(head, 0.03, -0.04)
    calls = _record_keeps(head, monkeypatch)
    sims, mask = head(*make_batch(5, 7))
    dense_kept = torch.cat([k for k in calls if k.dim() == 2])  # (B_v, N): the dense branch, per image
    # Blocks of (1 image, 7 captions, N) at pair_chunk_size 8, in image order.
    sparse_kept = torch.cat([k for k in calls if k.dim() == 3], dim=0).transpose(0, 1)
    assert sparse_kept.dtype == dense_kept.dtype == torch.float32
    if dual:
        assert torch.equal(mask[0].detach(), sparse_kept)
        assert torch.equal(mask[1].detach(), dense_kept.expand_as(mask[1]))
    else:
        assert torch.equal(mask.detach(), (sparse_kept + dense_kept) / 2)
    # So the mean of each mask (what blip2_seps logs as keep_ratio) is the fraction actually kept, and here it
    # is not the budget's 0.5.
    assert sparse_kept.mean().item() != pytest.approx(0.5) and dense_kept.mean().item() != pytest.approx(0.5)


@pytest.mark.parametrize("paper, dual", CONFIGS, ids=CONFIG_IDS)
def test_evaluation_keeps_the_budget_unless_asked_for_the_decisions(paper, dual, monkeypatch):
    head = make_head(paper, dual, pair_chunk_size=8)
    _shift_offsets(head, 0.5, 0.5)  # training would keep one patch per pair
    batch = make_batch(5, 7)
    calls = _record_keeps(head, monkeypatch)
    head.eval()
    with torch.no_grad():
        sims = head(*batch)
    assert calls and all(k.dtype == torch.bool for k in calls)
    assert all(bool((k.sum(dim=-1) == head.settings.num_keep).all()) for k in calls)  # ceil(16 * 0.5) = 8 everywhere
    with torch.no_grad():
        assert torch.allclose(sims, per_caption_loop_similarity(head, *batch), atol=1e-5)

    head.train()
    with torch.no_grad():
        sims_train, mask = head(*batch)
    assert (_sparse_dense(mask, dual)[0].sum(dim=-1) == 1).all()
    decided = make_head(paper, dual, pair_chunk_size=8, eval_by_decisions=True)
    decided.load_state_dict(head.state_dict())
    calls.clear()
    with torch.no_grad():
        assert torch.allclose(decided.eval()(*batch), sims_train, atol=1e-6)  # eval = training's selection


def test_eval_by_decisions_is_read_from_settings_and_deterministic():
    head = CrossSparseAggrNet({"embed_size": C, "num_patches": N, "eval_by_decisions": True})
    assert head.settings.eval_by_decisions and not make_head().settings.eval_by_decisions
    head.settings.use_gumbel_softmax = True  # noise is a training-only device
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(head.eval()(*batch), head(*batch))


def test_selection_scores_get_no_gradient_unless_the_setting_asks():
    batch = make_batch(6, 6)
    for paper in (False, True):
        for score_grad in (False, True):
            head = make_head(paper, False, selection_score_grad=score_grad).train()
            img, cap = batch[0].clone().requires_grad_(True), batch[1].clone().requires_grad_(True)
            _, mask = head(img, cap, *batch[2:])
            SEPSLoss(target_ratio=0.3).ratio_loss(mask).backward()  # through the decisions only
            if score_grad:
                assert cap.grad is not None and cap.grad.abs().sum() > 0
                assert img.grad is not None and img.grad.abs().sum() > 0
            else:
                assert cap.grad is None  # the caption's relevance cosines: no gradient (LAPS/SEPS)
                # Public-code scores are cosines only; the paper's learned predictor still trains on the patches.
                assert (img.grad is not None) == paper
            assert head.sparse_keep_threshold.grad.abs() > 0
    assert SepsHeadSettings().selection_score_grad is False
    assert CrossSparseAggrNet({"selection_score_grad": True}).settings.selection_score_grad


def test_gumbel_tau_sets_the_softness_of_the_backward_only():
    assert SepsHeadSettings().gumbel_tau == 1.0 == make_head().settings.gumbel_tau  # the seed reference's default
    assert CrossSparseAggrNet({"embed_size": C, "num_patches": N, "gumbel_tau": 0.3}).settings.gumbel_tau == 0.3
    state = make_head().state_dict()
    batch = make_batch(6, 6)
    results = []
    for tau in (1.0, 0.25):
        head = make_head(use_gumbel_softmax=True, gumbel_tau=tau)
        head.load_state_dict(state)
        torch.manual_seed(3)
        sims, mask = head.train()(*batch)
        SEPSLoss(target_ratio=0.3).ratio_loss(mask).backward()
        results.append((sims.detach(), mask[0].detach(), head.sparse_keep_threshold.grad.clone()))
    (sims_a, mask_a, grad_a), (sims_b, mask_b, grad_b) = results
    assert torch.equal(mask_a, mask_b) and torch.equal(sims_a, sims_b)  # same noise, same hard decisions
    assert not torch.allclose(grad_a, grad_b)
