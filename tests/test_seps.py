"""SEPS head (CrossSparseAggrNet) and SEPSLoss: shapes, invariances, gradients, hand-computed losses."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from _seps_reference import per_caption_loop_similarity

from lever_plugins import CrossSparseAggrNet, SEPSLoss
from lever_plugins.metrics import retrieval_metrics
from lever_plugins.modules import seps_selection
from lever_plugins.schemas.seps import SepsHeadSettings, SepsLossSettings, seps_head_parameter_count

CONFIGS = list(itertools.product([True, False], [True, False]))  # (use_paper_version, use_dual_aggr)
CONFIG_IDS = [f"{'paper' if p else 'code'}-{'dual' if d else 'single'}" for p, d in CONFIGS]

C, N, L_S, L_D = 32, 16, 6, 9


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


def make_head(paper: bool = True, dual: bool = True, **kwargs) -> CrossSparseAggrNet:
    options = dict(
        embed_size=C, num_patches=N, sparse_ratio=0.5, aggr_ratio=0.5, use_paper_version=paper, use_dual_aggr=dual
    )
    options.update(kwargs)
    return CrossSparseAggrNet(**options)


def make_batch(num_images: int = 5, num_captions: int = 7, has_cls: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(num_images, N + int(has_cls), C, generator=g)
    cap = torch.randn(num_captions, L_S, C, generator=g)
    cap_lens = torch.randint(1, L_S + 1, (num_captions,), generator=g)
    cap_lens[0] = L_S
    long_cap = torch.randn(num_images, L_D, C, generator=g)
    long_lens = torch.randint(1, L_D + 1, (num_images,), generator=g)
    return img, cap, cap_lens, long_cap, long_lens


# ---------------------------------------------------------------- seed quick start


def test_seed_quick_start_runs_as_written():
    """Seed 004 quick start (Steps 1-5), CPU, smaller sizes; the optimizer comes from its training example."""
    model = CrossSparseAggrNet(
        embed_size=64,
        num_patches=49,  # seed: 196 (ViT-B/16 at 224 px)
        sparse_ratio=0.5,
        aggr_ratio=0.4,
        use_paper_version=True,
    )
    criterion = SEPSLoss(
        margin=0.2,
        target_ratio=0.5,
        ratio_weight=2.0,
        max_violation=False,
        lambda_sparse=1.0,
        lambda_dense=1.0,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)

    img_embs = torch.randn(32, 50, 64)  # (B, N+1, C)
    cap_embs = torch.randn(32, 12, 64)  # (B, L_s, C)
    cap_lens = torch.full((32,), 12)  # (B,)
    long_cap_embs = torch.randn(32, 40, 64)  # (B, L_d, C)
    long_cap_lens = torch.full((32,), 40)  # (B,)
    img_ids = torch.arange(32)  # (B,)

    model.train()
    sims, score_mask = model(img_embs, cap_embs, cap_lens, long_cap_embs, long_cap_lens)
    total_loss, align_loss, ratio_loss = criterion(similarity_matrix=sims, score_mask=score_mask, img_ids=img_ids)
    before = [p.detach().clone() for p in model.parameters()]
    total_loss.backward()
    optimizer.step()
    optimizer.zero_grad()

    assert sims.shape == (32, 32)
    assert isinstance(score_mask, tuple) and len(score_mask) == 2
    assert all(m.shape == (32, 32, 49) for m in score_mask)
    assert torch.isfinite(total_loss) and align_loss > 0
    assert total_loss.item() == pytest.approx(align_loss.item() + 2.0 * ratio_loss.item(), rel=1e-6)
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


# ---------------------------------------------------------------- shapes and outputs


@pytest.mark.parametrize("paper, dual", CONFIGS, ids=CONFIG_IDS)
def test_shapes_in_train_and_eval(paper, dual):
    head = make_head(paper, dual)
    img, cap, cap_lens, long_cap, long_lens = make_batch(5, 7)
    head.eval()
    sims = head(img, cap, cap_lens, long_cap, long_lens)
    assert isinstance(sims, torch.Tensor) and sims.shape == (5, 7) and torch.isfinite(sims).all()

    head.train()
    sims_train, mask = head(img, cap, cap_lens, long_cap, long_lens)
    assert sims_train.shape == (5, 7)
    if dual:
        assert isinstance(mask, tuple) and len(mask) == 2
        masks = mask
    else:
        assert isinstance(mask, torch.Tensor)
        masks = (mask,)
    for m in masks:
        assert m.shape == (7, 5, N)
        assert ((m >= 0) & (m <= 1)).all()
    # No dropout, no Gumbel, and the decisions start (offset 0) at the budget's top set: the kept sets,
    # hence the train and eval similarities, agree until training moves the offsets.
    assert torch.allclose(sims, sims_train, atol=1e-6)


@pytest.mark.parametrize("paper, dual", CONFIGS, ids=CONFIG_IDS)
def test_without_dense_captions_only_the_sparse_branch_runs(paper, dual):
    head = make_head(paper, dual).train()
    img, cap, cap_lens, _, _ = make_batch()
    sims, mask = head(img, cap, cap_lens)
    assert sims.shape == (5, 7)
    assert isinstance(mask, torch.Tensor) and mask.shape == (7, 5, N)


def test_keep_decisions_are_hard_values_with_soft_gradients():
    head = make_head(True, True).train()
    sims, (sparse, dense) = head(*make_batch())
    for m in (sparse, dense):
        assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
        assert m.requires_grad
    # The dense decisions depend on the image only: the same for every caption.
    assert torch.equal(dense[0], dense[-1])


@pytest.mark.parametrize("has_cls", [True, False])
@pytest.mark.parametrize("paper, dual", CONFIGS, ids=CONFIG_IDS)
def test_vectorised_forward_equals_the_per_caption_loop(paper, dual, has_cls):
    head = make_head(paper, dual, has_cls=has_cls, pair_chunk_size=8).eval()
    batch = make_batch(6, 9, has_cls=has_cls)
    with torch.no_grad():
        ours = head(*batch)
        loop = per_caption_loop_similarity(head, *batch)
        ours_sparse = head(*batch[:3])
        loop_sparse = per_caption_loop_similarity(head, *batch[:3])
    assert torch.allclose(ours, loop, atol=1e-5)
    assert torch.allclose(ours_sparse, loop_sparse, atol=1e-5)


# ---------------------------------------------------------------- chunking and batch independence


@pytest.mark.parametrize("paper, dual", CONFIGS, ids=CONFIG_IDS)
def test_pair_chunk_size_does_not_change_the_result(paper, dual, monkeypatch):
    head = make_head(paper, dual)
    batch = make_batch(5, 7)
    results = []
    for chunk, item_chunk in ((1, 64), (7, 64), (10_000, 64), (10_000, 2)):
        head.settings.pair_chunk_size = chunk
        monkeypatch.setattr(seps_selection, "_ITEM_CHUNK", item_chunk)  # per-image work in chunks of 2 images
        head.eval()
        with torch.no_grad():
            sims = head(*batch)
        head.train()
        sims_train, mask = head(*batch)
        results.append((sims, sims_train, mask))
    for sims, sims_train, mask in results[1:]:
        assert torch.allclose(sims, results[0][0], atol=1e-6)
        assert torch.allclose(sims_train, results[0][1], atol=1e-6)
        masks, reference = (mask, results[0][2]) if dual else ((mask,), (results[0][2],))
        for m, r in zip(masks, reference):
            assert torch.equal(m.detach(), r.detach())


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("paper, dual", CONFIGS, ids=CONFIG_IDS)
def test_a_pair_score_does_not_depend_on_the_rest_of_the_batch(paper, dual, train):
    head = make_head(paper, dual, pair_chunk_size=6).train(train)
    img, cap, cap_lens, long_cap, long_lens = make_batch(8, 10)
    rows, cols = torch.tensor([6, 1, 3]), torch.tensor([9, 0, 4, 5])
    full = head(img, cap, cap_lens, long_cap, long_lens)
    part = head(img[rows], cap[cols], cap_lens[cols], long_cap[rows], long_lens[rows])
    if train:
        (full, full_mask), (part, part_mask) = full, part
        full_sparse = full_mask[0] if dual else full_mask
        part_sparse = part_mask[0] if dual else part_mask
        assert torch.equal(part_sparse.detach(), full_sparse.detach()[cols][:, rows])
    assert torch.allclose(part, full[rows][:, cols], atol=1e-6)


@pytest.mark.parametrize("paper, dual", CONFIGS, ids=CONFIG_IDS)
def test_evaluation_with_extreme_aggregation_logits_equals_the_loop(paper, dual, monkeypatch):
    """Evaluation normalises ``exp(logit - image max)`` over each pair's kept patches; where every kept logit
    lies far below the image's largest that underflows, and the exact masked softmax must take over."""
    head = make_head(paper, dual, pair_chunk_size=8).eval()
    with torch.no_grad():
        head.aggregation_scale.fill_(300.0)  # logits spread over hundreds
    exact_rows = []
    original = head._masked_softmax

    def recording(logits, keep):
        exact_rows.append(keep.shape[0])
        return original(logits, keep)

    monkeypatch.setattr(head, "_masked_softmax", recording)
    batch = make_batch(6, 9)
    with torch.no_grad():
        ours = head(*batch)
        loop = per_caption_loop_similarity(head, *batch)
    assert sum(exact_rows) > 0  # the fallback ran
    assert torch.isfinite(ours).all() and torch.allclose(ours, loop, atol=1e-5)
    assert torch.allclose(head(*batch), ours, atol=1e-6)  # with gradient (no reused buffers): the same


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("paper, dual", CONFIGS, ids=CONFIG_IDS)
def test_half_precision_evaluation_is_float32_within_its_rounding(paper, dual, dtype):
    """Scores, gathers and the aggregation normalisation stay in float64/float32 internally; what differs is
    the half-precision arithmetic of the rest (and a kept patch flipped by it). Same rounded weights and inputs."""
    head = make_head(paper, dual).eval().to(dtype).float()
    batch = [x.to(dtype).float() if x.is_floating_point() else x for x in make_batch()]
    with torch.no_grad():
        reference = head(*batch)
        half = head.to(dtype)(*(x.to(dtype) if x.is_floating_point() else x for x in batch))
    assert half.dtype == dtype and torch.isfinite(half).all()
    assert torch.allclose(half.float(), reference, atol=0.05 if dtype == torch.bfloat16 else 0.01)


def test_dense_caption_belongs_to_its_image_only():
    head = make_head(True, True).eval()
    img, cap, cap_lens, long_cap, long_lens = make_batch(6, 8)
    with torch.no_grad():
        before = head(img, cap, cap_lens, long_cap, long_lens)
        changed = long_cap.clone()
        changed[2] = torch.randn(L_D, C)
        after = head(img, cap, cap_lens, changed, long_lens)
    others = torch.arange(6) != 2
    assert torch.equal(after[others], before[others])
    assert (after[2] - before[2]).abs().min() > 0  # every caption's score with image 2 moved


@pytest.mark.parametrize("paper, dual", CONFIGS, ids=CONFIG_IDS)
def test_dense_caption_matters_in_every_configuration(paper, dual):
    head = make_head(paper, dual).eval()
    img, cap, cap_lens, long_cap, long_lens = make_batch()
    with torch.no_grad():
        a = head(img, cap, cap_lens, long_cap, long_lens)
        b = head(img, cap, cap_lens, torch.randn_like(long_cap), long_lens)
    assert not torch.allclose(a, b)


def test_padding_words_are_ignored():
    head = make_head(True, True).eval()
    img, cap, cap_lens, long_cap, long_lens = make_batch()
    cap_lens = torch.tensor([6, 2, 3, 1, 4, 6, 5])
    noisy = cap.clone()
    for j, n in enumerate(cap_lens.tolist()):
        noisy[j, n:] = 100 * torch.randn(L_S - n, C)
    long_noisy = long_cap.clone()
    for v, n in enumerate(long_lens.tolist()):
        long_noisy[v, n:] = 100 * torch.randn(L_D - n, C)
    with torch.no_grad():
        assert torch.allclose(head(img, cap, cap_lens, long_cap, long_lens), head(img, noisy, cap_lens, long_noisy, long_lens))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("score_grad", [False, True])
@pytest.mark.parametrize("paper, dual", CONFIGS, ids=CONFIG_IDS)
def test_gradients_reach_every_head_parameter_and_the_inputs(paper, dual, score_grad):
    head = make_head(paper, dual, selection_score_grad=score_grad).train()
    img, cap, cap_lens, long_cap, long_lens = make_batch(6, 6)
    for t in (img, cap, long_cap):
        t.requires_grad_(True)
    sims, mask = head(img, cap, cap_lens, long_cap, long_lens)
    total, _, _ = SEPSLoss()(sims, mask)
    total.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for t in (img, cap):
        assert t.grad is not None and t.grad.abs().sum() > 0
    # The dense caption only guides the selection: without score gradients (the default, as LAPS/SEPS)
    # it gets none; with selection_score_grad it does.
    if score_grad:
        assert long_cap.grad is not None and long_cap.grad.abs().sum() > 0
    else:
        assert long_cap.grad is None


@pytest.mark.parametrize("paper, dual", CONFIGS, ids=CONFIG_IDS)
def test_ratio_term_has_a_gradient_on_the_selectors(paper, dual):
    head = make_head(paper, dual).train()
    sims, mask = head(*make_batch(6, 6))
    # The decisions start at the budget (sparse_ratio 0.5, i.e. a zero ratio term at target 0.5): aim lower.
    _, _, ratio = SEPSLoss(target_ratio=0.3)(sims, mask)
    assert ratio.item() > 0
    ratio.backward()
    selectors = ["sparse_keep_threshold", "dense_keep_threshold"]
    if paper:
        selectors += ["sparse_score_predictor.0.weight", "dense_score_predictor.0.weight"]
    grads = dict(head.named_parameters())
    for name in selectors:
        assert grads[name].grad is not None and grads[name].grad.abs().sum() > 0, name
    # The ratio term does not touch the aggregation or the similarity.
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in grads.items() if "aggregation" in n)


@pytest.mark.parametrize("gumbel", [False, True])
def test_checkpointed_pair_blocks_give_the_same_outputs_and_gradients(gumbel):
    batch = make_batch(6, 6)
    state = make_head(True, True).state_dict()
    results = []
    for checkpointed in (False, True):
        head = make_head(True, True, use_gumbel_softmax=gumbel, checkpoint_pairs=checkpointed, pair_chunk_size=8)
        head.load_state_dict(state)
        head.train()
        torch.manual_seed(5)
        sims, mask = head(*batch)
        total, _, _ = SEPSLoss()(sims, mask)
        total.backward()
        results.append((sims.detach(), mask[0].detach(), {n: p.grad.clone() for n, p in head.named_parameters()}))
    (sims_a, mask_a, grads_a), (sims_b, mask_b, grads_b) = results
    assert torch.equal(sims_a, sims_b) and torch.equal(mask_a, mask_b)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6), name


def test_training_the_ratio_term_moves_the_kept_fraction_to_the_target():
    head = make_head(False, False).train()  # public-code scores; decisions start at the budget, 0.5
    batch = make_batch(6, 6)
    criterion = SEPSLoss(target_ratio=0.25)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    _, mask = head(*batch)
    start = criterion.ratio_loss(mask).item()
    for _ in range(60):
        _, mask = head(*batch)
        ratio = criterion.ratio_loss(mask)
        optimizer.zero_grad()
        ratio.backward()
        optimizer.step()
    assert start > 0.05
    assert ratio.item() < 0.1 * start


def test_gumbel_decisions_are_random_and_decide_what_training_keeps():
    head = make_head(True, True, use_gumbel_softmax=True).train()
    batch = make_batch()
    sims_a, mask_a = head(*batch)
    sims_b, mask_b = head(*batch)
    assert not torch.equal(mask_a[0], mask_b[0])
    assert set(mask_a[0].detach().unique().tolist()) <= {0.0, 1.0}
    # The sampled decisions choose the kept patches, so the training similarities are random too.
    assert not torch.equal(sims_a, sims_b)
    head.eval()
    with torch.no_grad():
        sims_eval = head(*batch)
        assert torch.equal(head(*batch), sims_eval)  # evaluation: no noise, the budget by score
        head.settings.use_gumbel_softmax = False
        sims_plain, _ = head.train()(*batch)
    # Without noise the decisions start (offset 0) at the budget's top set: training agrees with evaluation.
    assert torch.allclose(sims_plain, sims_eval, atol=1e-6)


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


# ---------------------------------------------------------------- errors and settings


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: (b[0][..., :16], *b[1:]), "img_embs must be"),
        (lambda b: (b[0], b[1][..., :16], *b[2:]), "cap_embs must be"),
        (lambda b: (b[0], b[1], b[2] + L_S, *b[3:]), r"cap_lens\[\d\] = \d+ is outside 1..6"),
        (lambda b: (b[0], b[1], b[2] * 0, *b[3:]), "cap_lens"),
        (lambda b: (b[0], b[1], b[2][:3], *b[3:]), r"cap_lens must be \(B_t,\)"),
        (lambda b: (*b[:3], b[3][:3], b[4][:3]), "long_cap_embs has 3 rows but there are 5 images"),
        (lambda b: (*b[:3], b[3][..., :8], b[4]), "long_cap_embs must be"),
        (lambda b: (*b[:3], b[3], b[4] + L_D), "long_cap_lens"),
        (lambda b: (*b[:3], b[3], None), "give both long_cap_embs and long_cap_lens"),
        (lambda b: (b[0][:, 1:], *b[1:]), "set has_cls=False"),
    ],
    ids=["img-dim", "cap-dim", "cap-len-too-long", "cap-len-zero", "cap-lens-count", "dense-rows", "dense-dim",
         "dense-len", "dense-len-missing", "cls-mismatch"],
)
def test_bad_input_gets_a_clear_error(change, message):
    head = make_head().eval()
    with pytest.raises(ValueError, match=message):
        head(*change(make_batch()))


def test_wrong_cls_flag_is_reported_not_guessed():
    head = make_head(has_cls=False)
    with pytest.raises(ValueError, match="17 tokens, i.e. 17 patches with has_cls=False.*set has_cls=True"):
        head(*make_batch(has_cls=True))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparse_ratio=1.0), "sparse_ratio"),
        (dict(sparse_ratio=0.99), "leaving none to fuse"),
        (dict(aggr_ratio=0.01), "aggregated tokens"),
        (dict(beta=0.6), "beta"),
        (dict(top_k=0), "top_k"),
        (dict(pair_chunk_size=0), "pair_chunk_size"),
        (dict(gumbel_tau=0.0), "gumbel_tau"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_head(**kwargs)


def test_settings_and_parameter_count():
    head = CrossSparseAggrNet({"embed_size": 32, "num_patches": 16, "use_dual_aggr": False})
    assert head.settings.embed_size == 32 and not head.settings.use_dual_aggr and head.settings.has_cls
    with pytest.raises(ValueError, match="sparse_ratoi: unknown key.*sparse_ratio"):
        CrossSparseAggrNet({"sparse_ratoi": 0.5})
    for paper, dual in CONFIGS:
        settings = SepsHeadSettings(embed_size=48, num_patches=36, use_paper_version=paper, use_dual_aggr=dual)
        built = CrossSparseAggrNet(settings)
        assert sum(p.numel() for p in built.parameters()) == seps_head_parameter_count(settings)
    assert sum(p.numel() for p in CrossSparseAggrNet().parameters()) == seps_head_parameter_count() == 246_393
    loss = SEPSLoss(SepsLossSettings(margin=0.3, max_violation=True))
    assert loss.settings.margin == 0.3 and loss.max_violation
    # keyword settings (the seed's call) and a settings object build the same modules; both at once is an error
    assert SEPSLoss(margin=0.3, max_violation=True).extra_repr() == loss.extra_repr()
    assert make_head().settings == SepsHeadSettings(
        embed_size=C, num_patches=N, sparse_ratio=0.5, aggr_ratio=0.5, use_paper_version=True, use_dual_aggr=True
    )
    with pytest.raises(TypeError, match="not both"):
        CrossSparseAggrNet(SepsHeadSettings(), embed_size=C)
    with pytest.raises(TypeError, match="not both"):
        SEPSLoss(SepsLossSettings(), margin=0.3)
    loss.set_max_violation(False)  # the task's switch is state: the settings keep what was configured
    assert not loss.max_violation and loss.settings.max_violation


@pytest.mark.parametrize(
    "num_patches, sparse_ratio, aggr_ratio, keep, aggregated",
    [
        (100, 0.07, 0.5, 7, 3),  # 100 * 0.07 = 7.000000000000001 in floats: ceil must still give 7
        (180, 0.5, 0.7, 90, 63),  # 180 * 0.7 * 0.5 = 62.99999999999999 in floats: int must still give 63
        (196, 0.5, 0.4, 98, 39),  # the seed's ViT-224 setting: 39.2 -> 39
        (49, 0.8, 0.6, 40, 23),  # Swin-224: ceil(39.2) = 40, int(23.52) = 23
    ],
)
def test_keep_and_aggregated_counts_are_exact_not_float_rounded(num_patches, sparse_ratio, aggr_ratio, keep, aggregated):
    settings = SepsHeadSettings(num_patches=num_patches, sparse_ratio=sparse_ratio, aggr_ratio=aggr_ratio)
    assert (settings.num_keep, settings.num_aggregated) == (keep, aggregated)
    head = CrossSparseAggrNet(
        embed_size=C, num_patches=num_patches, sparse_ratio=sparse_ratio, aggr_ratio=aggr_ratio
    )
    assert head.settings.num_keep == keep and head.sparse_aggregation[-1].out_features == aggregated

# ---------------------------------------------------------------- SEPSLoss by hand

S = torch.tensor(
    [
        [0.5, 0.6, 0.1],
        [0.4, 0.3, 0.2],
        [0.0, 0.35, 0.8],
    ]
)


def test_alignment_loss_by_hand_diagonal_positives():
    # margin 0.2. Image->text (row i, anchor S[i,i]):
    #   row 0 (0.5): caption 1 0.2+0.6-0.5 = 0.3, caption 2 -> 0          sum 0.3, max 0.3
    #   row 1 (0.3): caption 0 0.2+0.4-0.3 = 0.3, caption 2 0.2+0.2-0.3 = 0.1  sum 0.4, max 0.3
    #   row 2 (0.8): nothing                                                0
    # Text->image (column j, anchor S[j,j]):
    #   col 0 (0.5): image 1 0.2+0.4-0.5 = 0.1                              sum 0.1, max 0.1
    #   col 1 (0.3): image 0 0.2+0.6-0.3 = 0.5, image 2 0.2+0.35-0.3 = 0.25 sum 0.75, max 0.5
    #   col 2 (0.8): nothing
    loss = SEPSLoss(margin=0.2)
    total, align, ratio = loss(S, None)
    assert align.item() == pytest.approx(0.7 + 0.85)
    assert ratio.item() == 0.0 and total.item() == pytest.approx(1.55)
    assert loss(S, None, img_ids=torch.arange(3))[1].item() == pytest.approx(1.55)
    loss.set_max_violation(True)
    assert loss(S, None)[1].item() == pytest.approx(0.3 + 0.3 + 0.1 + 0.5)
    loss.set_max_violation(False)
    assert loss(S, None)[1].item() == pytest.approx(1.55)


def test_alignment_loss_by_hand_duplicate_images_are_not_negatives():
    # Seed convention: samples 0 and 1 show the same image, so (0, 1) and (1, 0) are positives.
    # Image->text: row 0 -> caption 2 only: 0; row 1 -> caption 2: 0.1; row 2: 0.
    # Text->image: col 0 -> image 2: 0; col 1 -> image 2: 0.25; col 2: 0.      total 0.35
    ids = torch.tensor([0, 0, 1])
    assert SEPSLoss(margin=0.2)(S, None, ids)[1].item() == pytest.approx(0.35)
    assert SEPSLoss(margin=0.2, max_violation=True)(S, None, ids)[1].item() == pytest.approx(0.35)


def test_alignment_loss_by_hand_unique_image_rows():
    # 2 image rows, 3 captions; captions 0, 1 show image 0, caption 2 image 1. Anchors: (0,0) 0.5,
    # (0,1) 0.6, (1,2) 0.2.
    # Image->text: anchor (0,0) vs caption 2: 0.2+0.1-0.5 < 0; anchor (0,1): 0.2+0.1-0.6 < 0;
    #   anchor (1,2) vs captions 0, 1: 0.2+0.4-0.2 = 0.4, 0.2+0.3-0.2 = 0.3   sum 0.7, max 0.4
    # Text->image: caption 0 vs image 1: 0.2+0.4-0.5 = 0.1; caption 1: 0.2+0.3-0.6 < 0;
    #   caption 2 vs image 0: 0.2+0.1-0.2 = 0.1                               sum 0.2, max 0.2
    sims = S[:2]
    ids = torch.tensor([0, 0, 1])
    assert SEPSLoss(margin=0.2)(sims, None, ids)[1].item() == pytest.approx(0.9)
    assert SEPSLoss(margin=0.2, max_violation=True)(sims, None, ids)[1].item() == pytest.approx(0.6)


def test_ratio_loss_by_hand():
    d_s = torch.tensor([1.0, 1.0, 1.0, 0.0])  # mean 0.75
    d_d = torch.tensor([1.0, 0.0, 0.0, 0.0])  # mean 0.25
    loss = SEPSLoss(target_ratio=0.5, ratio_weight=3.0, lambda_sparse=1.0, lambda_dense=2.0)
    total, align, ratio = loss(S, (d_s, d_d))
    assert ratio.item() == pytest.approx(1.0 * 0.25**2 + 2.0 * 0.25**2)
    assert total.item() == pytest.approx(align.item() + 3.0 * ratio.item())
    # A tensor mask: (mean - rho)^2 without the lambdas.
    assert loss(S, torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))[2].item() == pytest.approx(0.3**2)


def test_seed_one_image_several_captions_example():
    head = make_head().train()
    img, cap, cap_lens, long_cap, long_lens = make_batch(10, 10)
    img_ids = torch.tensor([i // 5 for i in range(10)])
    sims, mask = head(img[img_ids * 5], cap, cap_lens, long_cap[img_ids * 5], long_lens[img_ids * 5])
    total, align, ratio = SEPSLoss()(sims, mask, img_ids)
    assert torch.isfinite(total)


@pytest.mark.parametrize(
    "sims, ids, message",
    [
        (S[:2], None, "without img_ids it must be square"),
        (S[:2], torch.tensor([0, 2, 1]), r"img_ids\[j\] must be the row"),
        (S, torch.tensor([0, 1]), r"img_ids must be \(B_t,\)"),
        (S[0], None, "similarity_matrix must be"),
    ],
)
def test_loss_rejects_bad_input(sims, ids, message):
    with pytest.raises(ValueError, match=message):
        SEPSLoss()(sims, None, ids)


def test_loss_settings_are_validated():
    with pytest.raises(ValueError, match="margin"):
        SEPSLoss(margin=-0.1)
    with pytest.raises(ValueError, match="target_ratio"):
        SEPSLoss(target_ratio=0.0)


# ---------------------------------------------------------------- a tiny model learns


def test_training_raises_recall_on_captions_that_copy_patches():
    """Captions are noisy copies of 3 of the image's patches, seen through an unknown rotation.

    A linear text encoder (random at start) and the head are trained with SEPSLoss; recall on held-out
    images must rise from chance to near perfect.
    """
    torch.manual_seed(0)
    dim, patches, words, dense_words = 16, 8, 3, 4
    rotation = torch.linalg.qr(torch.randn(dim, dim))[0]

    def sample(num):
        img = F.normalize(torch.randn(num, patches + 1, dim), dim=-1)
        picks = torch.rand(num, patches).argsort(dim=1)
        gather = lambda idx: img[torch.arange(num)[:, None], 1 + idx]  # noqa: E731
        cap = gather(picks[:, :words]) @ rotation + 0.1 * torch.randn(num, words, dim)
        dense = gather(picks[:, words : words + dense_words]) @ rotation + 0.1 * torch.randn(num, dense_words, dim)
        return img, cap, torch.full((num,), words), dense, torch.full((num,), dense_words)

    head = CrossSparseAggrNet(embed_size=dim, num_patches=patches, sparse_ratio=0.5, aggr_ratio=0.5, top_k=2)
    text_encoder = torch.nn.Linear(dim, dim, bias=False)
    criterion = SEPSLoss()
    optimizer = torch.optim.Adam([*head.parameters(), *text_encoder.parameters()], lr=1e-2)

    def rsum(batch):
        img, cap, cap_lens, dense, dense_lens = batch
        head.eval()
        with torch.no_grad():
            sims = head(img, text_encoder(cap), cap_lens, text_encoder(dense), dense_lens)
        head.train()
        return retrieval_metrics(sims, torch.arange(len(img)))["rsum"]

    held_out = sample(32)
    before = rsum(held_out)
    for _ in range(300):
        img, cap, cap_lens, dense, dense_lens = sample(16)
        sims, mask = head(img, text_encoder(cap), cap_lens, text_encoder(dense), dense_lens)
        total, _, _ = criterion(sims, mask, torch.arange(16))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    after = rsum(held_out)
    assert before < 200  # chance is ~100 for 32 images, perfect 600
    assert after > 450
