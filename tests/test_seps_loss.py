"""SEPSLoss on hand-computed cases: alignment (hinge both ways, duplicate images) and the ratio term."""
from __future__ import annotations

import pytest
import torch

from lever_plugins import SEPSLoss
from _seps_helpers import make_batch, make_head

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (tests/conftest.py)


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
