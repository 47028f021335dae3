"""The registered SEPS retrieval model on a tiny random BLIP-2: losses, gradients, dense side, groups, loading."""
from __future__ import annotations

import math
import os

import pytest
import torch

from lever_plugins.compat import import_lavis

import_lavis()
pytestmark = pytest.mark.lavis

from lever_plugins.models.blip2_components import CheckpointMismatch  # noqa: E402
from lever_plugins.models.blip2_seps import Blip2SepsModel  # noqa: E402
from lever_plugins.schema import RecipeError  # noqa: E402

CAPTIONS = ["a red circle and a blue square", "a green cross on the left", "a yellow triangle", "a purple diamond at the top"]
DENSE = [
    "a red circle on the left and a blue square at the top",
    "a green cross on the left, a red square at the top and a blue circle at the bottom",
    "a yellow triangle on the right and an orange cross at the bottom",
    "a purple diamond at the top and a green circle on the right",
]


def build(**overrides) -> Blip2SepsModel:
    return Blip2SepsModel.from_config({"arch": "lever_blip2_seps", "model_type": "tiny", **overrides})


def batch(image_ids=(0, 1, 2, 3), image_size: int = 64) -> dict:
    generator = torch.Generator().manual_seed(1)
    size = len(image_ids)
    images = torch.randn(max(image_ids) + 1, 3, image_size, image_size, generator=generator)
    return {
        "image": images[list(image_ids)],
        "text_input": CAPTIONS[:size],
        "dense_text": [DENSE[i] for i in image_ids],
        "image_id": torch.tensor(image_ids),
    }


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_forward_loss_is_seps_plus_weighted_itc_and_reaches_every_trained_part():
    torch.manual_seed(0)
    model = build(loss_itc_weight=0.5).train()
    out = model(batch())
    assert {"loss", "loss_seps", "loss_align", "loss_ratio", "loss_itc", "keep_ratio", "keep_ratio_dense", "max_violation"} <= set(out)
    torch.testing.assert_close(out["loss"].detach(), out["loss_seps"] + 0.5 * out["loss_itc"])
    torch.testing.assert_close(out["loss_seps"], out["loss_align"] + 2.0 * out["loss_ratio"])
    assert 0.0 <= float(out["keep_ratio"]) <= 1.0 and float(out["max_violation"]) == 0.0
    out["loss"].backward()
    for name in ("seps_head", "image_token_proj", "word_proj", "visual_encoder", "Qformer", "vision_proj", "text_proj"):
        assert _grad_norm(getattr(model, name)) > 0, name
    assert model.query_tokens.grad.abs().sum() > 0
    # the ratio term reaches the head's keep thresholds (the public code's ratio loss had no gradient)
    assert model.seps_head.sparse_keep_threshold.grad.abs() > 0


@pytest.mark.parametrize("dual", [True, False])
def test_logged_keep_ratios_are_the_fractions_the_head_actually_keeps(dual, monkeypatch):
    torch.manual_seed(0)
    model = build(loss_itc_weight=0.0, seps_head={"use_dual_aggr": dual}).train()
    head = model.seps_head
    with torch.no_grad():  # decisions away from the budget, so a count per pair (not the constant 0.5)
        head.sparse_keep_threshold.fill_(0.02)
        head.dense_keep_threshold.fill_(-0.03)
    kept = []
    original = head._selection_weights

    def recording(score, logits, keep):  # what the forward actually keeps, block by block
        kept.append(keep.detach().clone())
        return original(score, logits, keep)

    monkeypatch.setattr(head, "_selection_weights", recording)
    out = model(batch())
    sparse = torch.cat([k.reshape(-1) for k in kept if k.dim() == 3])
    dense = torch.cat([k.reshape(-1) for k in kept if k.dim() == 2])
    assert sparse.dtype == torch.float32 and float(sparse.mean()) != pytest.approx(0.5)
    if dual:
        torch.testing.assert_close(out["keep_ratio"], sparse.mean())
        torch.testing.assert_close(out["keep_ratio_dense"], dense.mean())
    else:  # one tensor mask (D_s + D_d) / 2: the mean of the two branches' kept fractions
        assert "keep_ratio_dense" not in out
        torch.testing.assert_close(out["keep_ratio"], (sparse.mean() + dense.mean()) / 2)


@pytest.mark.parametrize("dual", [True, False])
def test_logged_keep_ratio_spread_is_the_spread_over_pairs(dual, monkeypatch):
    torch.manual_seed(0)
    model = build(loss_itc_weight=0.0, seps_head={"use_dual_aggr": dual}).train()
    head = model.seps_head
    with torch.no_grad():  # decisions away from the budget, so the kept fraction varies from pair to pair
        head.sparse_keep_threshold.fill_(0.02)
        head.dense_keep_threshold.fill_(-0.03)
    outputs = []
    forward = head.forward

    def recording(*args):
        outputs.append(forward(*args))
        return outputs[-1]

    monkeypatch.setattr(head, "forward", recording)
    out = model(batch())
    mask = outputs[0][1]
    masks = mask if dual else (mask,)
    for name, m in zip(("keep_ratio", "keep_ratio_dense"), masks):
        per_pair = m.detach().mean(dim=-1)  # (B_t, B_v)
        torch.testing.assert_close(out[name], per_pair.mean())
        torch.testing.assert_close(out[f"{name}_std"], per_pair.std(correction=0))
    assert float(out["keep_ratio_std"]) > 0
    assert ("keep_ratio_dense_std" in out) == dual


def test_without_itc_the_itc_branch_gets_no_gradient_and_a_frozen_vit_none_at_all():
    torch.manual_seed(0)
    model = build(loss_itc_weight=0.0, vision={"freeze": True}).train()
    out = model(batch())
    assert "loss_itc" not in out
    torch.testing.assert_close(out["loss"].detach(), out["loss_seps"])
    out["loss"].backward()
    assert model.vision_proj.weight.grad is None and model.query_tokens.grad is None
    assert all(p.grad is None and not p.requires_grad for p in model.visual_encoder.parameters())
    assert _grad_norm(model.word_proj) > 0 and _grad_norm(model.image_token_proj) > 0


def test_itc_loss_matches_a_hand_computation_with_several_captions_per_image():
    model = build()
    with torch.no_grad():
        model.temp.fill_(0.5)
    image_itc = torch.nn.functional.normalize(torch.tensor(
        [[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]]
    ), dim=-1)
    text_itc = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, -0.8]]), dim=-1)
    ids = torch.tensor([7, 7, 3])  # samples 0 and 1 show the same image
    loss = model.itc_loss(image_itc, text_itc, ids)

    scores = [[max(sum(q[e] * t[e] for e in range(2)) for q in image) / 0.5 for t in text_itc.tolist()]
              for image in image_itc.tolist()]
    positives = [[1.0 if ids[i] == ids[j] else 0.0 for j in range(3)] for i in range(3)]

    def direction(matrix):
        total = 0.0
        for i in range(3):
            log_z = math.log(sum(math.exp(v) for v in matrix[i]))
            weights = [p / sum(positives[i]) for p in positives[i]]
            total += -sum(w * (matrix[i][j] - log_z) for j, w in enumerate(weights))
        return total / 3

    transposed = [[scores[j][i] for j in range(3)] for i in range(3)]
    expected = (direction(scores) + direction(transposed)) / 2
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_duplicate_images_in_a_batch_are_positives_for_the_seps_loss():
    torch.manual_seed(0)
    model = build(loss_itc_weight=0.0).train()
    out = model(batch(image_ids=(0, 0, 1, 2)))  # captions 0 and 1 belong to the same image
    sims, _ = model.seps_head(
        model._head_image_tokens(model.image_tokens(batch((0, 0, 1, 2))["image"])),
        *model.encode_texts(CAPTIONS)[:2],
        *model.encode_dense_texts([DENSE[0], DENSE[0], DENSE[1], DENSE[2]])[:2],
    )
    # recompute the alignment loss treating (0, 1) as a negative: it must differ from the model's
    diagonal_only = model.seps_loss.alignment_loss(sims, None)
    assert not torch.isclose(out["loss_align"], diagonal_only.detach())


def test_dense_caption_belongs_to_its_image_row_only():
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        images = model.encode_images(batch()["image"])
        captions = model.encode_texts(CAPTIONS)
        dense = model.encode_dense_texts(DENSE)
        changed = model.encode_dense_texts([DENSE[0], DENSE[1], "a blue cross", DENSE[3]])
        sims = model.head_similarity(images.embeddings, dense.embeddings, dense.lengths, captions.embeddings, captions.lengths)
        after = model.head_similarity(images.embeddings, changed.embeddings, changed.lengths, captions.embeddings, captions.lengths)
    assert sims.shape == (4, 4)
    same = torch.ones(4, dtype=torch.bool)
    same[2] = False
    torch.testing.assert_close(after[same], sims[same], rtol=0, atol=0)
    assert not torch.allclose(after[2], sims[2])


def test_head_similarity_is_the_head_in_eval_mode_even_while_training():
    torch.manual_seed(0)
    model = build().train()
    with torch.no_grad():
        images = model.encode_images(batch()["image"])
        captions = model.encode_texts(CAPTIONS)
        dense = model.encode_dense_texts(DENSE)
        sims = model.head_similarity(images.embeddings, dense.embeddings, dense.lengths, captions.embeddings, captions.lengths)
    assert isinstance(sims, torch.Tensor) and sims.shape == (4, 4) and model.seps_head.training


def test_itc_similarity_is_max_over_query_features():
    image_itc = torch.randn(3, 4, 8)
    text_itc = torch.randn(5, 8)
    expected = torch.stack([torch.stack([(image_itc[v] @ text_itc[t]).max() for t in range(5)]) for v in range(3)])
    torch.testing.assert_close(Blip2SepsModel.itc_similarity(image_itc, text_itc), expected)


def test_param_groups_scale_the_backbone_and_cover_each_trainable_parameter_once():
    model = build(backbone_lr_scale=0.1)
    groups = model.param_groups_for_optimizer(weight_decay=1e-4)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for param in group["params"]:
            name = names[id(param)]
            head_side = name.startswith(("seps_head.", "image_token_proj.", "word_proj."))
            assert group["lr_scale"] == (1.0 if head_side else 0.1), name
            assert group["weight_decay"] == (0.0 if param.ndim < 2 or "bias" in name else 1e-4), name


def test_settings_cross_check_patch_count_and_reject_typos():
    with pytest.raises(RecipeError) as info:
        build(vision={"image_size": 32})
    assert any("seps_head.num_patches" in p and "gives 16 patch tokens" in p for p in info.value.problems)
    with pytest.raises(RecipeError, match="loss_itc_wieght: unknown key"):
        build(loss_itc_wieght=1.0)
    with pytest.raises(RecipeError, match="seps_head.sparse_ratio: must be < 1.0"):
        build(seps_head={"sparse_ratio": 1.5})



def test_text_lengths_beyond_the_qformer_positions_are_rejected_up_front():
    # Otherwise the first dense caption longer than 64 tokens crashes the run deep inside BERT's embeddings.
    with pytest.raises(RecipeError) as info:
        build(max_dense_txt_len=100, max_txt_len=65)
    problems = info.value.problems
    assert any("max_dense_txt_len" in p and "qformer.max_position_embeddings=64" in p for p in problems), problems
    assert any("max_txt_len" in p and "qformer.max_position_embeddings=64" in p for p in problems), problems
    assert build(max_dense_txt_len=64).max_dense_txt_len == 64

def test_has_cls_false_feeds_patches_only():
    torch.manual_seed(0)
    model = build(seps_head={"has_cls": False})
    with torch.no_grad():
        tokens = model.encode_images(batch()["image"]).embeddings
    assert tokens.shape == (4, 64, 64)
    assert model(batch())["loss"].isfinite()


def test_wrong_image_size_names_the_setting():
    model = build()
    with pytest.raises(ValueError, match="model.vision.image_size=64"):
        model.encode_images(torch.randn(2, 3, 32, 32))


def test_pretrained_blip2_checkpoint_may_lack_only_the_head(tmp_path):
    torch.manual_seed(0)
    source = build()
    state = {k: v for k, v in source.state_dict().items() if not k.startswith(("seps_head.", "image_token_proj.", "word_proj."))}
    state["itm_head.weight"] = torch.zeros(2, 64)  # BLIP-2 checkpoints carry heads this model does not use
    state["Qformer.cls.predictions.bias"] = torch.zeros(10)
    path = tmp_path / "blip2_like.pth"
    torch.save({"model": state}, path)
    loaded = build(pretrained=str(path))
    torch.testing.assert_close(loaded.query_tokens, source.query_tokens)
    torch.testing.assert_close(loaded.Qformer.bert.embeddings.word_embeddings.weight,
                               source.Qformer.bert.embeddings.word_embeddings.weight)
    del state["vision_proj.weight"]
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointMismatch, match="vision_proj.weight"):
        build(pretrained=str(path))


def test_pretrained_position_embedding_is_interpolated_to_the_image_size(tmp_path):
    torch.manual_seed(0)
    small = build(vision={"image_size": 32}, seps_head={"num_patches": 16})
    state = {k: v for k, v in small.state_dict().items() if not k.startswith(("seps_head.", "image_token_proj.", "word_proj."))}
    path = tmp_path / "blip2_32px.pth"
    torch.save(state, path)
    large = build(pretrained=str(path))
    assert large.visual_encoder.pos_embed.shape == (1, 65, 64)
    torch.testing.assert_close(large.visual_encoder.pos_embed[:, 0], small.visual_encoder.pos_embed[:, 0])  # CLS kept


def test_dry_run_plan_counts_the_parameters_the_model_builds():
    from lever_plugins.launch import describe_plan
    from lever_plugins.recipes import load_recipe

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    resolved = load_recipe(os.path.join(repo, "recipes", "demo", "flickr_seps.yaml"))
    model = Blip2SepsModel.from_config(resolved.data["model"])
    plan = describe_plan(resolved)
    assert f"{model.head_parameter_count():,} parameters" in plan
    assert "num_patches=64, has_cls=True" in plan and "backbone lr x 1.0" in plan
