"""Pointer selectors V1/V2/V3: settings, shapes, masking, teacher forcing, gradients, learning."""
from __future__ import annotations

import io

import pytest
import torch

import lever_plugins
from lever_plugins.modules.pointer import (
    PointerSelectorV1,
    PointerSelectorV2,
    PointerSelectorV3,
    build_model_v1,
    build_model_v2,
    build_model_v3,
    mc_dropout_logits,
)
from lever_plugins.schema import settings_from
from lever_plugins.schemas.pointer import (
    PointerSelectorV1Settings,
    PointerSelectorV2Settings,
    PointerSelectorV3Settings,
    pointer_parameter_count,
)

SMALL = dict(d_model=24, hidden_dim=16, K=10, shot_num=4)


def _inputs(batch=5, d=24, k=10, steps=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, d, generator=gen)
    cands = torch.randn(batch, k, d, generator=gen)
    labels = torch.stack([torch.randperm(k, generator=gen)[:steps] for _ in range(batch)])
    beam = torch.randn(batch, steps, generator=gen)
    return query, cands, labels, beam


def _small_models():
    return [
        build_model_v1(SMALL),
        build_model_v1({**SMALL, "query_update": "additive"}),
        build_model_v2({**SMALL, "num_heads": 2}),
        *(build_model_v3({**SMALL, "ranking_loss_type": kind}) for kind in ("listwise", "pairwise", "radi_pairwise", "radi_listwise")),
    ]


def _model_id(model):
    cfg = model.settings
    return f"{type(model).__name__}-{getattr(cfg, 'ranking_loss_type', cfg.query_update)}"


MODELS = _small_models()


def _run(model, query, cands, labels, beam):
    teacher = None
    if getattr(model.settings, "ranking_loss_type", "").startswith("radi"):
        teacher = mc_dropout_logits(build_model_v1(SMALL), query, cands, labels, num_samples=3)
    return model(query, cands, labels, beam_scores=beam, teacher_logits=teacher)


# ------------------------------------------------------------------ parameter counts


def _formula(d, h, cross_attention):
    bi_encoder = (d * h + h) + 2 * (h * h + h)  # shared input_proj + query_proj + cand_proj
    attention = (3 * h * h + 3 * h) + (h * h + h) + 2 * h  # in-proj, out-proj, LayerNorm
    return bi_encoder + (attention if cross_attention else 0)


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_default_parameter_counts():
    assert _count(build_model_v1()) == 131_456 == _formula(768, 128, False)
    assert _count(build_model_v3()) == 131_456
    assert _count(build_model_v2()) == _formula(768, 128, True) == 197_760
    v2_wide = build_model_v2(PointerSelectorV2Settings(hidden_dim=256))
    assert _count(v2_wide) == _formula(768, 256, True)
    assert round(_count(v2_wide) / 1e6, 2) == 0.59  # the seed's "0.59 M" holds at hidden 256


@pytest.mark.parametrize("model", MODELS, ids=_model_id)
def test_parameter_count_without_building(model):
    settings = model.settings
    assert pointer_parameter_count(settings.d_model, settings.hidden_dim, settings.model_type) == _count(model)


def test_seed_defaults():
    v1, v2, v3 = PointerSelectorV1Settings(), PointerSelectorV2Settings(), PointerSelectorV3Settings()
    assert (v1.d_model, v1.hidden_dim, v1.K, v1.shot_num) == (768, 128, 32, 6)
    assert (v1.temperature, v1.dropout, v1.label_smoothing) == (0.1, 0.3, 0.2)
    assert (v2.label_smoothing, v2.num_heads, v2.attn_dropout) == (0.1, 4, 0.1)
    assert (v3.ranking_loss_type, v3.ranking_loss_weight, v3.label_smoothing) == ("listwise", 0.1, 0.2)


def test_lazy_top_level_names():
    assert lever_plugins.PointerSelectorV2 is PointerSelectorV2
    assert lever_plugins.build_model_v3 is build_model_v3


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("build", ["constructor", "settings_from", "module"])
@pytest.mark.parametrize(
    "cls, kwargs, key",
    [
        (PointerSelectorV1Settings, {"hidden_dim": 0}, "hidden_dim"),
        (PointerSelectorV1Settings, {"temperature": 0.0}, "temperature"),
        (PointerSelectorV1Settings, {"dropout": 1.0}, "dropout"),
        (PointerSelectorV1Settings, {"label_smoothing": -0.1}, "label_smoothing"),
        (PointerSelectorV1Settings, {"K": 4, "shot_num": 5}, "shot_num"),
        (PointerSelectorV1Settings, {"K": 32.5}, "K"),
        (PointerSelectorV1Settings, {"shot_num": True}, "shot_num"),
        (PointerSelectorV1Settings, {"query_update": "gru"}, "query_update"),
        (PointerSelectorV2Settings, {"hidden_dim": 30, "num_heads": 4}, "num_heads"),
        (PointerSelectorV2Settings, {"attn_dropout": 1.5}, "attn_dropout"),
        (PointerSelectorV3Settings, {"ranking_loss_type": "lambdarank"}, "ranking_loss_type"),
        (PointerSelectorV3Settings, {"ranking_loss_weight": -1.0}, "ranking_loss_weight"),
        (PointerSelectorV3Settings, {"radi_cold_sampling": "uniform"}, "radi_cold_sampling"),
        (PointerSelectorV3Settings, {"radi_hot_k": 33}, "radi_hot_k"),
        (PointerSelectorV3Settings, {"radi_list_loss": "lambdaloss"}, "radi_list_loss"),
    ],
)
def test_settings_reject_bad_values(cls, kwargs, key, build):
    module = {PointerSelectorV1Settings: PointerSelectorV1, PointerSelectorV2Settings: PointerSelectorV2,
              PointerSelectorV3Settings: PointerSelectorV3}[cls]
    make = {"constructor": lambda: cls(**kwargs), "settings_from": lambda: settings_from(cls, kwargs, "model"),
            "module": lambda: module(kwargs)}[build]
    # a recipe block names its key path; settings built in Python name their class
    where = f"{cls.__name__}: (.*; )?{key}: " if build == "constructor" else f"model.{key}: "
    with pytest.raises(ValueError, match=where):
        make()


def test_builders_check_settings_types_and_keys():
    with pytest.raises(ValueError, match="PointerSelectorV2Settings"):
        build_model_v2(PointerSelectorV1Settings())
    with pytest.raises(ValueError, match="hiden_dim"):
        build_model_v1({"hiden_dim": 64})
    assert build_model_v2({"hidden_dim": 64}).settings.hidden_dim == 64
    settings = PointerSelectorV3Settings(ranking_loss_type="pairwise")
    assert build_model_v3(settings).settings is settings  # kept, not copied
    assert build_model_v1().settings == PointerSelectorV1Settings()


@pytest.mark.parametrize("model_type", ["v1", "v2", "v3"])
def test_recipe_block_builds_the_settings_of_its_version(model_type):
    from dataclasses import fields

    from lever_plugins.schemas.icl import PointerSelectorSettings

    block = PointerSelectorSettings(arch="lever_pointer_selector", model_type=model_type, hidden_dim=64, K=12)
    selector = block.selector_settings()
    assert type(selector).model_type == model_type
    assert {f.name: getattr(selector, f.name) for f in fields(selector)} == {
        f.name: getattr(block, f.name) for f in fields(selector)
    }
    # Every key of the block is read by some version's selector or by the LAVIS model itself.
    read = {f.name for cls in (PointerSelectorV1Settings, PointerSelectorV2Settings, PointerSelectorV3Settings) for f in fields(cls)}
    assert {f.name for f in fields(block)} - read == {"arch", "model_type", "teacher_checkpoint", "finetuned"}


# ------------------------------------------------------------------ forward / shapes / masking


@pytest.mark.parametrize("model", MODELS, ids=_model_id)
def test_forward_shapes_finite_loss_and_masking(model):
    query, cands, labels, beam = _inputs()
    out = _run(model, query, cands, labels, beam)
    assert out["logits"].shape == (5, 4, 10) and out["predictions"].shape == (5, 4)
    assert torch.isfinite(out["loss"]) and out["loss"].dim() == 0
    for s in range(4):
        chosen = out["logits"][torch.arange(5)[:, None], s, labels[:, :s]]
        assert torch.isinf(chosen).all() and (chosen < 0).all()
        assert torch.isfinite(out["logits"][:, s]).sum() == 5 * (10 - s)


@pytest.mark.parametrize("model", MODELS, ids=_model_id)
def test_every_parameter_gets_a_finite_gradient(model):
    model.zero_grad()
    query, cands, labels, beam = _inputs(seed=3)
    _run(model, query, cands, labels, beam)["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_loss_is_finite_when_the_whole_pool_is_selected():
    cfg = dict(d_model=8, hidden_dim=8, K=4, shot_num=4)
    query, cands, labels, beam = _inputs(batch=3, d=8, k=4, steps=4)
    for model in (build_model_v1(cfg), build_model_v3({**cfg, "ranking_loss_type": "pairwise"}), build_model_v3(cfg)):
        out = model(query, cands, labels, beam_scores=beam)
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
        pred, _ = model.predict(query, cands)
        assert sorted(pred[0].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("model", MODELS[:3], ids=_model_id)
def test_predict_never_repeats_and_is_batched_consistently(model):
    query, cands, _, _ = _inputs(batch=64, seed=5)
    pred, scores = model.predict(query, cands)
    assert pred.shape == scores.shape == (64, 4)
    assert all(len(set(row.tolist())) == 4 for row in pred)
    assert ((scores > 0) & (scores <= 1)).all()
    # One query at a time gives the same selections as the batch.
    for i in (0, 17, 63):
        single, _ = model.predict(query[i : i + 1], cands[i : i + 1])
        assert torch.equal(single[0], pred[i])
    # Decoding its own picks teacher-forced reproduces them.
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(query, cands, pred, return_loss=False)["predictions"], pred)


def test_predict_top_k_ranks_available_candidates():
    model = build_model_v1({**SMALL, "query_update": "additive"})
    query, cands, _, _ = _inputs(batch=8)
    ranked, probs = model.predict(query, cands, top_k=3)
    greedy, greedy_probs = model.predict(query, cands)
    assert ranked.shape == probs.shape == (8, 4, 3)
    assert torch.equal(ranked[..., 0], greedy) and torch.allclose(probs[..., 0], greedy_probs)
    assert (probs[..., :-1] >= probs[..., 1:]).all()
    for b in range(8):
        for s in range(4):
            assert not set(ranked[b, s].tolist()) & set(greedy[b, :s].tolist())
    with pytest.raises(ValueError, match="top_k"):
        model.predict(query, cands, top_k=8)  # K - shot_num + 1 = 7


def test_predict_restores_training_mode_and_is_deterministic():
    model = build_model_v2({**SMALL, "num_heads": 2})
    query, cands, _, _ = _inputs()
    model.train()
    first = model.predict(query, cands)
    assert model.training
    second = model.predict(query, cands)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.parametrize("model", MODELS[:3], ids=_model_id)
def test_dropout_in_train_mode_only(model):
    query, cands, labels, _ = _inputs()
    model.train()
    a, b = (model(query, cands, labels)["logits"] for _ in range(2))
    assert not torch.equal(a, b)
    model.eval()
    with torch.no_grad():
        c, d = (model(query, cands, labels)["logits"] for _ in range(2))
    assert torch.equal(c, d)
    model.train()


# ------------------------------------------------------------------ teacher forcing


def test_teacher_forcing_uses_labels_not_predictions():
    model = build_model_v1(SMALL).eval()
    query, cands, _, _ = _inputs(batch=4)
    with torch.no_grad():
        step0 = model(query, cands, None, return_loss=False)["logits"][:, 0]
        worst = step0.argmin(-1)  # a label the model would never pick
        best = step0.argmax(-1)
        other = torch.stack([torch.tensor([w, (w + 1) % 10, (w + 2) % 10]) for w in worst.tolist()])
        forced = model(query, cands, other)["logits"]
    # Step 1 masks the label of step 0 (the argmin), not the model's own choice (the argmax).
    assert torch.isinf(forced[torch.arange(4), 1, worst]).all()
    assert torch.isfinite(forced[torch.arange(4), 1, best]).all()


@pytest.mark.parametrize("update", ["none", "additive"])
def test_step_logits_depend_only_on_earlier_labels(update):
    model = build_model_v1({**SMALL, "query_update": update}).eval()
    query, cands, labels, _ = _inputs(batch=6, seed=2)
    changed = labels.clone()
    changed[:, 2:] = torch.stack([torch.tensor([c for c in range(10) if c not in row[:2]][-2:]) for row in labels.tolist()])
    with torch.no_grad():
        a = model(query, cands, labels)["logits"]
        b = model(query, cands, changed)["logits"]
    torch.testing.assert_close(a[:, :3], b[:, :3])  # steps 0..2 see labels[:, :2] only
    assert not torch.equal(a[:, 3], b[:, 3])


def test_additive_query_state_matches_manual_computation():
    model = build_model_v1({**SMALL, "query_update": "additive"}).eval()
    query, cands, labels, _ = _inputs(batch=3, seed=4)
    with torch.no_grad():
        logits = model(query, cands, labels)["logits"]
        q, c = model.encode(query, cands)
        for b in range(3):
            state = q[b].clone()
            for s in range(4):
                expected = torch.nn.functional.cosine_similarity(state.expand(10, -1), c[b], dim=-1) / 0.1
                keep = torch.ones(10, dtype=torch.bool)
                keep[labels[b, :s]] = False
                torch.testing.assert_close(logits[b, s, keep], expected[keep], rtol=1e-5, atol=1e-5)
                state = state + c[b, labels[b, s]]


def test_fixed_query_state_gives_the_same_scores_at_every_step():
    model = build_model_v1(SMALL).eval()
    query, cands, labels, _ = _inputs()
    with torch.no_grad():
        logits = model(query, cands, labels)["logits"]
    finite = torch.isfinite(logits[:, 3])
    torch.testing.assert_close(logits[:, 0][finite], logits[:, 3][finite])


# ------------------------------------------------------------------ V3 losses in the model


def test_v3_total_is_ce_plus_weighted_ranking_and_weight_zero_is_v1():
    query, cands, labels, beam = _inputs()
    v3 = build_model_v3({**SMALL, "ranking_loss_weight": 0.3}).eval()
    out = v3(query, cands, labels, beam_scores=beam)
    assert out["loss"].item() == pytest.approx(out["ce_loss"].item() + 0.3 * out["ranking_loss"].item(), rel=1e-6)
    assert out["ranking_loss"].item() > 0

    v1 = build_model_v1(SMALL).eval()
    v1.load_state_dict(v3.state_dict())
    v3_zero = build_model_v3({**SMALL, "ranking_loss_weight": 0.0}).eval()
    v3_zero.load_state_dict(v3.state_dict())
    assert v3_zero(query, cands, labels, beam_scores=beam)["loss"].item() == pytest.approx(
        v1(query, cands, labels)["loss"].item(), rel=1e-6
    )


def test_v3_needs_its_ranking_inputs():
    query, cands, labels, _ = _inputs()
    with pytest.raises(ValueError, match="beam_scores"):
        build_model_v3(SMALL)(query, cands, labels)
    with pytest.raises(ValueError, match="teacher_logits"):
        build_model_v3({**SMALL, "ranking_loss_type": "radi_pairwise"})(query, cands, labels)
    # Without a loss nothing is needed.
    assert "loss" not in build_model_v3(SMALL)(query, cands, labels, return_loss=False)


def test_v3_radi_pairwise_space_reaches_the_loss():
    from lever_plugins.modules.ranking import adaptive_pairwise_distillation_loss

    query, cands, labels, _ = _inputs()
    teacher = mc_dropout_logits(build_model_v1(SMALL), query, cands, labels, num_samples=3)
    values = {}
    for space in ("logits", "probs"):
        model = build_model_v3({**SMALL, "ranking_loss_type": "radi_pairwise", "radi_pairwise_space": space, "ranking_margin": 0.4})
        model.load_state_dict(MODELS[0].state_dict())
        model.eval()
        out = model(query, cands, labels, teacher_logits=teacher)
        logits, available = out["logits"].reshape(-1, 10), torch.isfinite(out["logits"]).reshape(-1, 10)
        expected = adaptive_pairwise_distillation_loss(logits, teacher.reshape(3, -1, 10), available, margin=0.4,
                                                       top_k=model.settings.radi_hot_k, space=space)
        assert out["ranking_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
        values[space] = out["ranking_loss"].item()
    assert values["logits"] != pytest.approx(values["probs"], rel=1e-3)
    assert PointerSelectorV3Settings().radi_pairwise_space == "logits"
    with pytest.raises(ValueError, match="radi_pairwise_space"):
        PointerSelectorV3Settings(radi_pairwise_space="ranks")


def test_mc_dropout_logits_shapes_variation_and_mode():
    teacher = build_model_v1(SMALL).eval()
    query, cands, labels, _ = _inputs(batch=2)
    samples = mc_dropout_logits(teacher, query, cands, labels, num_samples=4)
    assert samples.shape == (4, 2, 4, 10)
    assert not torch.equal(samples[0], samples[1])  # dropout was on
    assert not teacher.training and not samples.requires_grad
    assert torch.isinf(samples[:, torch.arange(2), 1, labels[:, 0]]).all()
    # Without dropout every sample is the ordinary teacher-forced forward pass.
    for teacher in (build_model_v1({**SMALL, "dropout": 0.0}), build_model_v2({**SMALL, "dropout": 0.0, "attn_dropout": 0.0, "num_heads": 2})):
        samples = mc_dropout_logits(teacher, query, cands, labels, num_samples=2)
        expected = teacher(query, cands, labels, return_loss=False)["logits"].detach()
        torch.testing.assert_close(samples, expected.expand(2, -1, -1, -1))


# ------------------------------------------------------------------ input validation


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda q, c, y: (q, c, torch.tensor([[0, 1, 1, 2]] * 5)), "repeat"),
        (lambda q, c, y: (q, c, y + 10), r"\[0, 10\)"),
        (lambda q, c, y: (q, c, y.float()), "integer"),
        (lambda q, c, y: (q, c[:, :9], y), "cand_emb"),
        (lambda q, c, y: (q[:, :20], c, y), "query_emb"),
        (lambda q, c, y: (q, c, y[:3]), "labels"),
    ],
)
def test_bad_inputs_are_rejected(change, match):
    model = build_model_v1(SMALL)
    with pytest.raises(ValueError, match=match):
        model(*change(*_inputs()[:3]))


def test_state_dict_round_trip():
    model = build_model_v2({**SMALL, "num_heads": 2}).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = PointerSelectorV2(model.settings).eval()
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    query, cands, labels, _ = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(query, cands, labels)["loss"], clone(query, cands, labels)["loss"])


@pytest.mark.lavis
def test_model_checkpoints_are_read_weights_only_and_loaded_strictly(tmp_path):
    from lever_plugins.checkpoints import CheckpointMismatch
    from lever_plugins.models.pointer_selector import PointerSelectorModel
    from lever_plugins.schema import RecipeError

    block = {"arch": "lever_pointer_selector", "model_type": "v1", **SMALL}
    model = PointerSelectorModel.from_config(block)
    run_checkpoint = tmp_path / "checkpoint_best.pth"
    torch.save({"model": model.state_dict(), "config": {"model": block}, "epoch": 3}, run_checkpoint)
    again = PointerSelectorModel.from_config({**block, "finetuned": str(run_checkpoint)})
    assert all(torch.equal(value, again.state_dict()[key]) for key, value in model.state_dict().items())

    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("selector.query_proj.")}, partial)
    with pytest.raises(CheckpointMismatch, match=r"model.finetuned .*partial.pth: 2 weights missing .*selector.query_proj"):
        PointerSelectorModel.from_config({**block, "finetuned": str(partial)})
    v2_weights = tmp_path / "v2.pth"
    torch.save(PointerSelectorModel.from_config({**block, "model_type": "v2", "num_heads": 2}).state_dict(), v2_weights)
    with pytest.raises(CheckpointMismatch, match=r"v2.pth: \d+ checkpoint weights this model does not have .*selector.cross_attn"):
        PointerSelectorModel.from_config({**block, "finetuned": str(v2_weights)})
    with pytest.raises(CheckpointMismatch, match=r"model.finetuned .*absent.pth: checkpoint file not found"):
        PointerSelectorModel.from_config({**block, "finetuned": str(tmp_path / "absent.pth")})

    student = {**block, "model_type": "v3", "ranking_loss_type": "radi_pairwise"}
    with pytest.raises(CheckpointMismatch, match=r"model.teacher_checkpoint .*absent.pth: checkpoint file not found"):
        PointerSelectorModel.from_config({**student, "teacher_checkpoint": str(tmp_path / "absent.pth")})
    with pytest.raises(RecipeError, match="partial.pth is not a lever_pointer_selector run checkpoint"):
        PointerSelectorModel.from_config({**student, "teacher_checkpoint": str(partial)})
    torch.save({"model": torch.load(partial, weights_only=True), "config": {"model": block}}, partial)
    with pytest.raises(CheckpointMismatch, match=r"model.teacher_checkpoint .*partial.pth: 2 weights missing"):
        PointerSelectorModel.from_config({**student, "teacher_checkpoint": str(partial)})
    teacher = PointerSelectorModel.from_config({**student, "teacher_checkpoint": str(run_checkpoint)})._teacher
    assert all(torch.equal(value, teacher.state_dict()[key]) for key, value in model.selector.state_dict().items())


# ------------------------------------------------------------------ learning a planted rule


@pytest.mark.parametrize("cls", [PointerSelectorV1, PointerSelectorV3])
def test_selector_learns_a_planted_rule(cls, one_thread):
    """Relevance = <U q, V c> with hidden rank-4 maps; labels = the 4 most relevant, best first."""
    d, k, steps = 32, 16, 4
    gen = torch.Generator().manual_seed(0)
    u_map, v_map = torch.randn(4, d, generator=gen), torch.randn(4, d, generator=gen)

    def batch(n):
        query = torch.randn(n, d, generator=gen)
        cands = torch.randn(n, k, d, generator=gen)
        relevance = torch.einsum("br,bkr->bk", query @ u_map.T, cands @ v_map.T)
        order = relevance.argsort(-1, descending=True)[:, :steps]
        return query, cands, order, relevance.gather(1, order)

    torch.manual_seed(0)
    model = cls(cls.settings_class(d_model=d, hidden_dim=32, K=k, shot_num=steps))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(250):
        query, cands, labels, rel = batch(64)
        loss = model(query, cands, labels, beam_scores=rel)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    query, cands, labels, _ = batch(512)
    model.eval()
    with torch.no_grad():
        step_top1 = (model(query, cands, labels, return_loss=False)["predictions"] == labels).float().mean()
    predictions, _ = model.predict(query, cands)
    first_pick = (predictions[:, 0] == labels[:, 0]).float().mean()
    chance = 1 / k
    assert step_top1 > 8 * chance, step_top1  # ~0.75 in practice
    assert first_pick > 8 * chance, first_pick


def test_keyword_settings_build_the_same_selector_as_a_mapping():
    torch.manual_seed(0)
    by_keys = PointerSelectorV2(d_model=16, hidden_dim=8, num_heads=2)
    torch.manual_seed(0)
    by_mapping = build_model_v2({"d_model": 16, "hidden_dim": 8, "num_heads": 2})
    assert by_keys.settings == by_mapping.settings
    for (name, a), (_, b) in zip(by_keys.state_dict().items(), by_mapping.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(TypeError, match="not both"):
        PointerSelectorV2({"d_model": 16}, hidden_dim=8)
