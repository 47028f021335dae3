"""``lever_blip2_cir`` with the plugin off computes exactly what SPRC's own model computes.

How ``tests/data/sprc_parity/`` was produced (once, outside this repository): SPRC's
``Blip2QformerCirAlignPrompt`` and its modified Q-Former (chunmeifeng/SPRC, ``src/lavis``, commit
2935a53) were imported from a checkout, with ``init_tokenizer`` / ``init_vision_encoder`` /
``init_Qformer`` overridden to build the tiny configuration of :data:`SETTINGS` (32 query tokens,
because SPRC hard-codes the readout index 32) offline. Every weight except ``temp`` was redrawn
independently (``torch.Generator().manual_seed(2024)``: norms ``1 + 0.1 N(0,1)``, everything else
``0.5 N(0,1)``), so each query-branch FFN differs from its text twin as in a pretrained BLIP-2. The
model was saved with SPRC's ``save_model`` layout (``{"epoch": 3, "Blip2QformerCirAlignPrompt":
state_dict}``, ``weights.pt``) and run on ``inputs.pt`` (4 reference / target images) with the four
texts of ``expected.json``: SPRC's ``forward`` in train mode gave the three losses, forward hooks on
``text_proj`` / ``vision_proj`` gave the fusion, rtc and target features, and in eval mode
``extract_target_features`` + ``inference`` gave the retrieval scores.

The SPRC code itself is not in this repository; only its outputs are.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lever_plugins.compat import import_lavis

import_lavis()
pytestmark = pytest.mark.lavis

from lever_plugins.models.blip2_cir import Blip2CirModel  # noqa: E402
from lever_plugins.models.blip2_components import CheckpointMismatch  # noqa: E402

DATA = Path(__file__).parent / "data" / "sprc_parity"
ATOL = 1e-5

SETTINGS = {
    "arch": "lever_blip2_cir",
    "model_type": "tiny",
    "vision": {"image_size": 64, "patch_size": 8, "width": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
               "precision": "fp32", "freeze": True},
    "qformer": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                "max_position_embeddings": 64, "cross_attention_freq": 2, "num_query_token": 32,
                "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "embed_dim": 16,
    "max_txt_len": 16,
    "loss_rtc_weight": 0.4,
    "loss_align_weight": 0.4,
    "finetuned": str(DATA / "weights.pt"),
}


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((DATA / "expected.json").read_text())


@pytest.fixture(scope="module")
def inputs() -> dict:
    return torch.load(DATA / "inputs.pt", weights_only=True)


def build(**overrides) -> Blip2CirModel:
    return Blip2CirModel.from_config({**SETTINGS, **overrides})


def close(actual: torch.Tensor, recorded) -> None:
    torch.testing.assert_close(actual.detach().float(), torch.tensor(recorded), atol=ATOL, rtol=0)


def capture_projections(model: Blip2CirModel) -> tuple[dict, list]:
    captured = {"text_proj": [], "vision_proj": []}
    hooks = [getattr(model, name).register_forward_hook(lambda m, i, o, n=name: captured[n].append(o.detach()))
             for name in captured]
    return captured, hooks


def test_weights_really_differ_between_query_and_text_ffn():
    state = torch.load(DATA / "weights.pt", weights_only=True)["Blip2QformerCirAlignPrompt"]
    for layer in range(2):
        text = state[f"Qformer.bert.encoder.layer.{layer}.intermediate.dense.weight"]
        query = state[f"Qformer.bert.encoder.layer.{layer}.intermediate_query.dense.weight"]
        assert (text - query).abs().max() > 0.1


@pytest.mark.parametrize("use_gated_fusion", [False, True], ids=["plugin_off", "plugin_on_at_init"])
def test_training_losses_and_features_equal_sprc(expected, inputs, use_gated_fusion):
    # SPRC's training checkpoint loads strictly; with the plugin on, only the plugin's own weights are new
    # and, the module being the identity at init, every number is still SPRC's.
    model = build(use_gated_fusion=use_gated_fusion, gated_fusion={"num_heads": 2}).train()
    captured, hooks = capture_projections(model)
    out = model({"reference_image": inputs["reference_image"], "target_image": inputs["target_image"],
                 "text_input": expected["texts"]})
    for hook in hooks:
        hook.remove()
    for name in ("loss_itc", "loss_rtc", "loss_align"):
        close(out[name], expected[name])
    close(out["loss"], expected["loss_total_sprc_weights"])
    fusion, rtc = captured["text_proj"]
    close(torch.nn.functional.normalize(fusion, dim=-1), expected["train_fusion_features"])
    close(torch.nn.functional.normalize(rtc, dim=-1), expected["train_rtc_features"])
    close(torch.nn.functional.normalize(captured["vision_proj"][0], dim=-1), expected["train_target_features"])


def test_retrieval_scores_equal_sprc_inference(expected, inputs):
    model = build().eval()
    with torch.no_grad():
        target = model.target_features(inputs["target_image"])
        query = model.fusion_features(inputs["reference_image"], expected["texts"])
        sims = model.similarity(query, target)
    close(target, expected["eval_target_features"])
    close(query, expected["eval_fusion_features"])
    close(sims, expected["inference_sims"])


def test_sprc_checkpoint_with_a_missing_weight_is_refused(tmp_path):
    checkpoint = torch.load(DATA / "weights.pt", weights_only=True)
    del checkpoint["Blip2QformerCirAlignPrompt"]["text_proj.weight"]
    path = tmp_path / "sprc_best.pt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointMismatch, match="text_proj.weight"):
        build(finetuned=str(path))


def test_checkpoint_with_gate_weights_is_refused_by_a_model_without_the_plugin(tmp_path):
    gated = build(use_gated_fusion=True, gated_fusion={"num_heads": 2})
    path = tmp_path / "gated.pth"
    torch.save({"model": gated.state_dict(), "epoch": 1}, path)
    with pytest.raises(CheckpointMismatch, match="gated_fusion"):
        build(finetuned=str(path))
