"""GatedFusionModule: identity at init, padding invariance, widths, gradients, settings."""
from __future__ import annotations

import pytest
import torch

from lever_plugins.modules.gated_fusion import GatedFusionModule
from lever_plugins.schemas.gated_fusion import GatedFusionSettings, gated_fusion_parameter_count


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _inputs(batch=2, num_image=10, num_text=6, hidden=32, text_width=24):
    image = torch.randn(batch, num_image, hidden)
    text = torch.randn(batch, num_text, text_width)
    return image, text


# --- parameter count ---------------------------------------------------------------------------


def test_parameter_count_matches_seed_at_hidden_768():
    # Seed 002 reports 2,952,193 = one 768-d nn.MultiheadAttention (4*768*768 + 4*768 = 2,362,368)
    # + a bias-free 768x768 gate (589,824) + scalar alpha.
    module = GatedFusionModule(768)
    assert _count(module) == 2_362_368 + 589_824 + 1 == 2_952_193
    mha = torch.nn.MultiheadAttention(768, 8)
    attention = [module.q_proj, module.k_proj, module.v_proj, module.out_proj]
    assert sum(_count(m) for m in attention) == _count(mha)
    assert _count(module.gate_proj) == 768 * 768
    assert module.alpha.numel() == 1


def test_parameter_count_at_blip2_vitg_widths():
    h, t = 1408, 768
    # q, out: h*h + h each; k, v: t*h + h each; gate: h*h; alpha: 1
    by_hand = 2 * (h * h + h) + 2 * (t * h + h) + h * h + 1
    assert by_hand == 8_115_713
    assert _count(GatedFusionModule(h, text_width=t)) == by_hand
    assert gated_fusion_parameter_count(h, t) == by_hand
    assert gated_fusion_parameter_count(768) == 2_952_193


# --- the seed's test (hidden 768, batch 4, 257 image tokens, 32 text tokens) --------------------


def test_seed_shapes_and_gradients_reach_both_inputs():
    module = GatedFusionModule(768)
    with torch.no_grad():
        module.alpha.fill_(0.5)  # at alpha = 0 the text gradient is exactly zero (see next test)
    image = torch.randn(4, 257, 768, requires_grad=True)
    text = torch.randn(4, 32, 768, requires_grad=True)
    out = module(image, text)
    assert out.shape == image.shape == (4, 257, 768)
    (out * torch.randn_like(out)).sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert text.grad is not None and text.grad.abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_at_init_only_alpha_receives_gradient():
    module = GatedFusionModule(32, text_width=24, num_heads=4)
    image, text = _inputs()
    image.requires_grad_(True)
    text.requires_grad_(True)
    out = module(image, text)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    assert module.alpha.grad is not None and module.alpha.grad.abs() > 0
    for name, p in module.named_parameters():
        if name != "alpha":
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
    assert torch.count_nonzero(text.grad) == 0
    # d out / d image is the identity at init
    assert torch.equal(image.grad, weights)


def test_zero_text_changes_image_far_less_than_real_text():
    module = GatedFusionModule(768)
    with torch.no_grad():
        module.alpha.fill_(1.0)
    image = torch.randn(4, 257, 768)
    real = torch.randn(4, 32, 768)
    zero = torch.zeros(4, 32, 768)
    with torch.no_grad():
        diff_real = (module(image, real) - image).abs().mean()
        diff_zero = (module(image, zero) - image).abs().mean()
    assert diff_real > 1e-3
    assert diff_zero < 0.01 * diff_real


# --- identity, padding, widths -----------------------------------------------------------------


@pytest.mark.parametrize("hidden,text_width,heads", [(32, 32, 4), (1408, 768, 8)])
def test_identity_at_init_is_bitwise(hidden, text_width, heads):
    module = GatedFusionModule(hidden, text_width=text_width, num_heads=heads)
    image, text = _inputs(batch=2, num_image=9, num_text=5, hidden=hidden, text_width=text_width)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(module(image, text), image)
    assert torch.equal(module(image, text, mask), image)
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(image, text, mask), image)


def test_identity_at_init_under_autocast_keeps_dtype():
    module = GatedFusionModule(32, text_width=24, num_heads=4)
    image, text = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(image, text)
    assert out.dtype == torch.float32
    assert torch.equal(out, image)


def test_nonzero_alpha_init_breaks_identity():
    module = GatedFusionModule(32, text_width=24, num_heads=4, alpha_init=0.5)
    image, text = _inputs()
    assert module.alpha.item() == 0.5
    assert not torch.allclose(module(image, text), image)


def test_padding_tokens_have_no_influence():
    module = GatedFusionModule(32, text_width=24, num_heads=4, alpha_init=1.0)
    image, text = _inputs(num_text=6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        reference = module(image, text, mask)
        # Change the padded positions and append large junk tokens marked as padding.
        changed = text.clone()
        changed[0, 4:] = 1e3 * torch.randn(2, 24)
        junk = 1e3 * torch.randn(2, 5, 24)
        longer = torch.cat([changed, junk], dim=1)
        longer_mask = torch.cat([mask, torch.zeros(2, 5, dtype=mask.dtype)], dim=1)
        out = module(image, longer, longer_mask)
        # The first row equals running on its 4 real tokens alone.
        alone = module(image[:1], text[:1, :4])
    assert torch.allclose(out, reference, atol=1e-5)
    assert torch.allclose(reference[:1], alone, atol=1e-5)
    # Without the mask the junk would matter: the test can fail.
    with torch.no_grad():
        unmasked = module(image, longer)
    assert not torch.allclose(unmasked, reference, atol=1e-3)


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.float32])
def test_all_padding_row_gives_zero_update_and_no_nan(mask_dtype):
    module = GatedFusionModule(32, text_width=24, num_heads=4, alpha_init=1.0)
    image, text = _inputs()
    image.requires_grad_(True)
    text.requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]).to(mask_dtype)
    out, gate = module(image, text, mask, return_gate=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], image[1].detach())
    assert not torch.allclose(out[0], image[0])
    assert torch.equal(gate[1], torch.zeros(10))
    out.square().sum().backward()
    for name, p in module.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert torch.isfinite(text.grad).all() and torch.count_nonzero(text.grad[1]) == 0


def test_vision_and_text_widths_differ():
    module = GatedFusionModule(1408, text_width=768)
    with torch.no_grad():
        module.alpha.fill_(1.0)
    image = torch.randn(2, 257, 1408)
    text = torch.randn(2, 7, 768)
    out, gate = module(image, text, torch.ones(2, 7), return_gate=True)
    assert out.shape == (2, 257, 1408)
    assert gate.shape == (2, 257)
    assert ((gate > 0) & (gate < 1)).all()
    with pytest.raises(ValueError, match="text_width=768"):
        module(image, torch.randn(2, 7, 1408))  # text in the vision width: the ancestor's confusion


@pytest.mark.parametrize(
    "image_shape,text_shape,mask_shape,message",
    [
        ((2, 10, 31), (2, 6, 24), None, r"image_embeds must be \(B, N, hidden_size=32\)"),
        ((2, 32), (2, 6, 24), None, "image_embeds must be"),
        ((2, 10, 32), (2, 6, 32), None, r"text_embeds must be \(B, L, text_width=24\)"),
        ((2, 10, 32), (3, 6, 24), None, "batch sizes differ"),
        ((2, 10, 32), (2, 6, 24), (2, 5), r"text_attention_mask must be \(B, L\) = \(2, 6\)"),
        ((2, 10, 32), (2, 6, 24), (2, 6, 1), "text_attention_mask must be"),
        ((2, 10, 32), (2, 0, 24), None, "no tokens"),
    ],
)
def test_bad_inputs_raise_clear_errors(image_shape, text_shape, mask_shape, message):
    module = GatedFusionModule(32, text_width=24, num_heads=4)
    mask = None if mask_shape is None else torch.ones(mask_shape)
    with pytest.raises(ValueError, match=message):
        module(torch.randn(image_shape), torch.randn(text_shape), mask)


def test_train_and_eval_compute_the_same_without_dropout():
    module = GatedFusionModule(32, text_width=24, num_heads=4, alpha_init=1.0)
    image, text = _inputs()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        module.train()
        train_out, train_gate = module(image, text, mask, return_gate=True)
        module.eval()
        eval_out, eval_gate = module(image, text, mask, return_gate=True)
    assert torch.equal(train_out, eval_out)
    assert torch.equal(train_gate, eval_gate)


def test_dropout_acts_in_training_only():
    plain = GatedFusionModule(32, text_width=24, num_heads=4, alpha_init=1.0)
    dropped = GatedFusionModule(32, text_width=24, num_heads=4, alpha_init=1.0, dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    image, text = _inputs()
    with torch.no_grad():
        plain.eval()
        dropped.eval()
        assert torch.equal(dropped(image, text), plain(image, text))
        dropped.train()
        assert not torch.allclose(dropped(image, text), plain(image, text))


def test_state_dict_keys_and_round_trip():
    module = GatedFusionModule(32, text_width=24, num_heads=4, alpha_init=0.3)
    assert set(module.state_dict()) == {
        "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
        "out_proj.weight", "out_proj.bias", "gate_proj.weight", "alpha",
    }
    copy = GatedFusionModule(32, text_width=24, num_heads=4)
    copy.load_state_dict(module.state_dict())
    image, text = _inputs()
    assert torch.equal(copy(image, text), module(image, text))


def test_learns_a_planted_text_conditioned_shift_from_identity_init():
    # Rule: each image token should move by a fixed linear map of the mean of the *real* text tokens.
    torch.manual_seed(1)
    hidden, text_width = 16, 8
    planted = torch.randn(text_width, hidden) * 0.5
    module = GatedFusionModule(hidden, text_width=text_width, num_heads=2)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)

    def batch():
        image = torch.randn(16, 5, hidden)
        text = torch.randn(16, 6, text_width)
        lengths = torch.randint(1, 7, (16,))
        mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
        mean_text = (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return image, text, mask, image + (mean_text @ planted)[:, None, :]

    eval_batch = batch()
    with torch.no_grad():
        initial = torch.nn.functional.mse_loss(module(*eval_batch[:3]), eval_batch[3]).item()
    for _ in range(300):
        image, text, mask, target = batch()
        loss = torch.nn.functional.mse_loss(module(image, text, mask), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(module(*eval_batch[:3]), eval_batch[3]).item()
    assert module.alpha.item() != 0.0
    assert final < 0.2 * initial


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_heads": 0}, "num_heads: must be >= 1, got 0"),
        ({"dropout": 1.0}, "dropout: must be < 1.0, got 1.0"),
        ({"dropout": -0.1}, "dropout: must be >= 0.0, got -0.1"),
    ],
)
def test_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatedFusionSettings(**kwargs)


def test_settings_reads_every_key():
    settings = GatedFusionSettings(num_heads=4, dropout=0.25, alpha_init=0.125)
    module = GatedFusionModule(32, 24, settings)
    assert module.settings is settings
    assert (module.settings.num_heads, module.settings.dropout, module.alpha.item()) == (4, 0.25, 0.125)
    assert (module.hidden_size, module.text_width, module.head_dim) == (32, 24, 8)
    # a mapping (recipe block) and keyword settings work the same way
    same = GatedFusionModule(32, 24, {"num_heads": 4, "dropout": 0.25, "alpha_init": 0.125})
    assert same.extra_repr() == module.extra_repr()
    keywords = GatedFusionModule(32, text_width=24, num_heads=4, dropout=0.25, alpha_init=0.125)
    assert keywords.extra_repr() == module.extra_repr()
    defaults = GatedFusionModule(1408, 768, None)
    assert (defaults.settings.num_heads, defaults.settings.dropout, defaults.alpha.item()) == (8, 0.0, 0.0)
    with pytest.raises(TypeError, match="not both"):
        GatedFusionModule(32, 24, settings, num_heads=4)


def test_settings_report_every_problem_in_a_mapping():
    with pytest.raises(ValueError) as info:
        GatedFusionModule(32, 24, {"num_head": 8, "dropout": 2.0, "alpha_init": "zero"})
    text = str(info.value)
    assert "gated_fusion.num_head: unknown key (did you mean 'num_heads'?)" in text
    assert "gated_fusion.dropout: must be < 1.0, got 2.0" in text
    assert "gated_fusion.alpha_init: expected a number" in text


def test_num_heads_must_divide_the_vision_width():
    with pytest.raises(ValueError, match="num_heads=12 must divide hidden_size=1408"):
        GatedFusionModule(1408, 768, GatedFusionSettings(num_heads=12))
    assert GatedFusionModule(768, num_heads=12).head_dim == 64  # fine at the text width


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"hidden_size": 0}, "hidden_size must be a positive integer"),
        ({"hidden_size": 32, "text_width": 0}, "text_width must be a positive integer"),
        ({"hidden_size": 32, "dropout": 1.5}, "gated_fusion.dropout: must be < 1.0, got 1.5"),
        ({"hidden_size": 32, "alpha_init": float("nan")}, "gated_fusion.alpha_init: must be finite, got nan"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GatedFusionModule(**kwargs)
