"""SEPS head (CrossSparseAggrNet) and SEPSLoss: shapes, invariances, gradients, hand-computed losses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _seps_reference import per_caption_loop_similarity

from lever_plugins import CrossSparseAggrNet, SEPSLoss
from lever_plugins.metrics import retrieval_metrics
from lever_plugins.modules import seps_selection
from lever_plugins.schemas.seps import SepsHeadSettings, SepsLossSettings, seps_head_parameter_count

from _seps_helpers import C, CONFIG_IDS, CONFIGS, L_D, L_S, N, make_batch, make_head

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


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
