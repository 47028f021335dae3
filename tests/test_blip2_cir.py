"""The registered CIR model on a tiny random BLIP-2: losses, identity at init, train/eval gate use, loading."""
from __future__ import annotations

import pytest
import torch

from lever_plugins.compat import import_lavis

import_lavis()
pytestmark = pytest.mark.lavis

from lever_plugins.models.blip2_cir import Blip2CirModel  # noqa: E402
from lever_plugins.models.blip2_components import CheckpointMismatch  # noqa: E402
from lever_plugins.schema import RecipeError  # noqa: E402

TEXTS = ["make it blue", "change it to a square and move it to the left", "make it red", "move it to the top"]


def build(**overrides) -> Blip2CirModel:
    block = {"arch": "lever_blip2_cir", "model_type": "tiny", **overrides}
    return Blip2CirModel.from_config(block)


def batch(size: int = 4, image_size: int = 64) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {
        "reference_image": torch.randn(size, 3, image_size, image_size, generator=generator),
        "target_image": torch.randn(size, 3, image_size, image_size, generator=generator),
        "text_input": TEXTS[:size],
    }


def gated_twin(baseline: Blip2CirModel, **gate_settings) -> Blip2CirModel:
    """A gated model holding exactly the baseline's weights (the plugin keys are new)."""
    gated = build(use_gated_fusion=True, gated_fusion={"num_heads": 4, **gate_settings})
    missing, unexpected = gated.load_state_dict(baseline.state_dict(), strict=False)
    assert unexpected == []
    assert missing and all(k.startswith("gated_fusion.") for k in missing)
    return gated


def test_forward_returns_loss_and_parts_with_weights_from_settings():
    torch.manual_seed(0)
    model = build(loss_rtc_weight=0.4, loss_align_weight=0.25)
    out = model(batch())
    assert set(out) == {"loss", "loss_itc", "loss_rtc", "loss_align"}
    expected = out["loss_itc"] + 0.4 * out["loss_rtc"] + 0.25 * out["loss_align"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    out["loss"].backward()
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0
    assert model.prompt_tokens.grad is not None and model.prompt_tokens.grad.abs().sum() > 0
    assert model.text_proj.weight.grad.abs().sum() > 0 and model.vision_proj.weight.grad.abs().sum() > 0


def test_gated_fusion_is_exact_identity_at_init():
    torch.manual_seed(0)
    baseline = build().eval()
    gated = gated_twin(baseline).eval()
    inputs = batch()
    with torch.no_grad():
        assert torch.equal(
            baseline.fusion_features(inputs["reference_image"], inputs["text_input"]),
            gated.fusion_features(inputs["reference_image"], inputs["text_input"]),
        )
        for key in ("loss", "loss_itc", "loss_rtc", "loss_align"):
            assert torch.equal(baseline(inputs)[key], gated(inputs)[key]), key


def test_first_step_trains_alpha_and_plugin_is_counted():
    torch.manual_seed(0)
    gated = gated_twin(build())
    gated(batch())["loss"].backward()
    assert gated.gated_fusion.alpha.grad is not None and gated.gated_fusion.alpha.grad.abs() > 0
    assert gated.plugin_parameter_count() == 3 * 64 * 64 + 2 * 64 * 64 + 4 * 64 + 1


def test_gate_is_applied_identically_in_training_and_retrieval():
    torch.manual_seed(0)
    baseline = build()
    gated = gated_twin(baseline, alpha_init=0.7)
    inputs = batch()
    with torch.no_grad():
        gated.train()
        train_feats = gated.fusion_features(inputs["reference_image"], inputs["text_input"])
        gated.eval()
        eval_feats = gated.fusion_features(inputs["reference_image"], inputs["text_input"])
        baseline.eval()
        base_feats = baseline.fusion_features(inputs["reference_image"], inputs["text_input"])
    # the tiny preset has no dropout, so train and eval must agree exactly...
    torch.testing.assert_close(train_feats, eval_feats, rtol=0, atol=0)
    # ...and the gate, moved away from identity, must reach the retrieval features
    assert not torch.equal(eval_feats, base_feats)
    with torch.no_grad():
        tokens = gated.image_tokens(inputs["reference_image"])
        fused = gated.fused_image_tokens(tokens, gated.tokenize(inputs["text_input"]))
    assert (fused - tokens).abs().mean() > 1e-2


def test_similarity_is_max_over_target_queries():
    query = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    targets = torch.nn.functional.normalize(torch.randn(5, 4, 8), dim=-1)
    sims = Blip2CirModel.similarity(query, targets)
    expected = torch.stack([torch.stack([(targets[t] @ query[q]).max() for t in range(5)]) for q in range(3)])
    torch.testing.assert_close(sims, expected)


def test_from_config_rejects_typos_like_the_cli():
    with pytest.raises(RecipeError, match="use_gated_fuson: unknown key"):
        build(use_gated_fuson=True)


def test_pretrained_checkpoint_may_lack_only_plugin_and_new_keys(tmp_path):
    torch.manual_seed(0)
    source = build()
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("prompt_tokens")}
    state["itm_head.weight"] = torch.zeros(2, 64)  # BLIP-2 has an ITM head this model does not use
    path = tmp_path / "blip2_like.pth"
    torch.save({"model": state}, path)
    loaded = build(use_gated_fusion=True, gated_fusion={"num_heads": 4}, pretrained=str(path))
    torch.testing.assert_close(loaded.query_tokens, source.query_tokens)
    torch.testing.assert_close(loaded.Qformer.bert.embeddings.word_embeddings.weight,
                               source.Qformer.bert.embeddings.word_embeddings.weight)

    del state["Qformer.bert.encoder.layer.0.attention.self.query.weight"]
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatch, match="layer.0.attention.self.query.weight"):
        build(pretrained=str(path))


@pytest.mark.slow
def test_full_widths_and_local_eva_checkpoint(tmp_path):
    """The pretrain preset's real widths (ViT-g 1408, BERT-base 768, 32 queries), shallow, plus EVA loading."""
    shallow = {"vision": {"depth": 1, "precision": "fp32"}, "qformer": {"num_hidden_layers": 2,
               "vocab_file": "package:configs/demo_vocab.txt"}}
    torch.manual_seed(0)
    model = Blip2CirModel.from_config({"arch": "lever_blip2_cir", "model_type": "pretrain", "use_gated_fusion": True,
                                       **shallow})
    assert model.gated_fusion.hidden_size == 1408 and model.gated_fusion.text_width == 768
    assert model.plugin_parameter_count() == 8_115_713
    assert all(not p.requires_grad for p in model.visual_encoder.parameters())  # frozen as in SPRC
    eva = dict(model.visual_encoder.state_dict())
    eva["head.weight"] = torch.zeros(1, 1408)  # EVA checkpoints carry a head LAVIS drops
    path = tmp_path / "eva_vit_g.pth"
    torch.save(eva, path)
    torch.manual_seed(1)
    loaded = Blip2CirModel.from_config({"arch": "lever_blip2_cir", "model_type": "pretrain",
                                        "vision": {**shallow["vision"], "checkpoint": str(path)},
                                        "qformer": shallow["qformer"]})
    torch.testing.assert_close(loaded.visual_encoder.patch_embed.proj.weight, model.visual_encoder.patch_embed.proj.weight)
    with torch.no_grad():
        images = torch.randn(1, 3, 224, 224)
        assert loaded.target_features(images).shape == (1, 32, 256)
        assert loaded.fusion_features(images, ["make it blue"]).shape == (1, 256)


def test_param_groups_give_the_plugin_its_lr_scale_and_never_decay_alpha():
    model = build(use_gated_fusion=True, gated_fusion={"num_heads": 4}, gated_fusion_lr_scale=50.0)
    groups = {g["name"]: g for g in model.param_groups_for_optimizer(0.05)}
    assert set(groups) == {"backbone", "gated_fusion", "gated_fusion_no_decay"}
    assert groups["gated_fusion_no_decay"]["params"] == [model.gated_fusion.alpha]
    assert groups["gated_fusion_no_decay"]["weight_decay"] == 0.0
    assert groups["gated_fusion"]["lr_scale"] == 50.0 and groups["gated_fusion"]["weight_decay"] == 0.05
    assert groups["backbone"]["lr_scale"] == 1.0 and groups["backbone"]["weight_decay"] == 0.05
    # SPRC's single AdamW group: biases, norms, temperature and prompts decay too
    backbone = {id(p) for p in groups["backbone"]["params"]}
    assert {id(model.temp), id(model.prompt_tokens), id(model.text_proj.bias), id(model.ln_vision.weight)} <= backbone
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(id(p) for g in groups.values() for p in g["params"]) == sorted(id(p) for p in trainable)


def test_param_groups_with_the_lavis_decay_rule():
    model = build(decay_all_parameters=False)
    groups = {g["name"]: g for g in model.param_groups_for_optimizer(0.05)}
    assert set(groups) == {"backbone", "backbone_no_decay"}
    no_decay = {id(p) for p in groups["backbone_no_decay"]["params"]}
    assert {id(model.temp), id(model.text_proj.bias), id(model.ln_vision.weight)} <= no_decay
    assert id(model.text_proj.weight) not in no_decay and groups["backbone_no_decay"]["weight_decay"] == 0.0


def test_gated_forward_reports_how_far_the_gate_has_opened():
    torch.manual_seed(0)
    model = build(use_gated_fusion=True, gated_fusion={"num_heads": 4})
    with torch.no_grad():
        model.gated_fusion.alpha.fill_(0.25)
    out = model(batch())
    assert out["gate_alpha"].item() == pytest.approx(0.25)
    assert 0.0 < out["gate_mean"].item() < 1.0
    assert "gate_alpha" not in build()(batch())
