"""Transformers BLIP-2 folders <-> the LAVIS layout: features equal transformers' own, nothing dropped silently.

A tiny ``Blip2ForImageTextRetrieval`` is built from a config with every weight redrawn independently
(the query FFN differs from the text FFN, EVA's key bias is nonzero), saved with ``save_pretrained``,
converted, and loaded into ``lever_blip2_cir`` / ``lever_blip2_seps`` (by file and by naming the folder
in ``model.pretrained``): their ITC image features (``vision_proj`` of the Q-Former query outputs) and
text features equal transformers' (``use_image_text_matching_head=False``) within 1e-4, and the ITM
score of LAVIS's own ``Blip2Qformer`` on the converted weights equals transformers' ITM score. Tests
that need transformers' BLIP-2 classes skip on transformers < 4.45 (the legacy LAVIS stack); the LAVIS
-> folder -> LAVIS round trip and the loading of a folder need no transformers model and run there.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from lever_plugins.compat import import_lavis

import_lavis()
pytestmark = pytest.mark.lavis

import transformers  # noqa: E402

from lever_plugins.cli import main  # noqa: E402
from lever_plugins.models import convert_blip2 as convert  # noqa: E402
from lever_plugins.models.blip2_cir import Blip2CirModel  # noqa: E402
from lever_plugins.models.blip2_components import (  # noqa: E402
    CheckpointMismatch, build_qformer, build_tokenizer, build_vision_encoder, load_checked, load_torch_file,
)
from lever_plugins.models.blip2_seps import Blip2SepsModel  # noqa: E402
from lever_plugins.schemas.blip2 import QformerSettings, VisionSettings  # noqa: E402

needs_retrieval = pytest.mark.skipif(
    not hasattr(transformers, "Blip2ForImageTextRetrieval"),
    reason=f"transformers {transformers.__version__} has no Blip2ForImageTextRetrieval (>= 4.45)",
)

# not installed on the legacy stack: folders are written as pytorch_model.bin there
HAS_SAFETENSORS = importlib.util.find_spec("safetensors") is not None
ATOL = 1e-4
TEXTS = ["a red square on the left", "two blue circles", "a green triangle above a square", "nothing"]
VOCAB = "package:configs/demo_vocab.txt"
VISION = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
          "precision": "fp32", "freeze": True}
QFORMER = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 48,
           "max_position_embeddings": 40, "cross_attention_freq": 2, "num_query_token": 4,
           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "vocab_file": VOCAB}
EMBED_DIM = 16
VOCAB_SIZE = len(build_tokenizer(QformerSettings(vocab_file=VOCAB)))


def cir_model(pretrained=None, **overrides) -> Blip2CirModel:
    block = {"arch": "lever_blip2_cir", "model_type": "tiny", "vision": VISION, "qformer": QFORMER,
             "embed_dim": EMBED_DIM, "max_txt_len": 16, "pretrained": pretrained, **overrides}
    return Blip2CirModel.from_config(block).eval()


def seps_model(pretrained=None) -> Blip2SepsModel:
    block = {"arch": "lever_blip2_seps", "model_type": "tiny", "vision": VISION, "qformer": QFORMER,
             "embed_dim": EMBED_DIM, "max_txt_len": 16, "pretrained": pretrained,
             "max_dense_txt_len": 32, "seps_head": {"embed_size": 32, "num_patches": 16}}
    return Blip2SepsModel.from_config(block).eval()


def redraw(module: torch.nn.Module, seed: int) -> None:
    """Every weight independent (norms 1 + 0.1 N, the rest 0.3 N): no twin weights hide a mapping error."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            is_norm = "norm" in name.lower() and name.endswith("weight")
            param.copy_(1 + 0.1 * noise if is_norm else 0.3 * noise)


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def tokens(model, texts=TEXTS):
    return model.tokenizer(texts, padding="longest", truncation=True, max_length=16, return_tensors="pt")


@torch.no_grad()
def our_features(model, pixels, text) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC features of one of our models: ``(B, Q, E)`` image and ``(B, E)`` text, L2-normalised."""
    if isinstance(model, Blip2SepsModel):
        image = model.encode_images(pixels).itc
        return image, model.encode_texts(TEXTS).itc
    image = model.target_features(pixels)
    hidden = model.Qformer.bert(text.input_ids, attention_mask=text.attention_mask, return_dict=True).last_hidden_state
    return image, F.normalize(model.text_proj(hidden[:, 0, :]), dim=-1)


def hf_config(**top):
    config = transformers.Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, "layer_norm_eps": 1e-6, "qkv_bias": True},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 48,
                        "max_position_embeddings": 40, "cross_attention_frequency": 2, "encoder_hidden_size": 32,
                        "vocab_size": VOCAB_SIZE, "use_qformer_text_input": True,
                        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        num_query_tokens=4, image_text_hidden_size=EMBED_DIM, image_token_index=None, **top,
    )
    return config


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random Blip2ForImageTextRetrieval saved as safetensors, and the model itself."""
    if not hasattr(transformers, "Blip2ForImageTextRetrieval"):
        pytest.skip(f"transformers {transformers.__version__} has no Blip2ForImageTextRetrieval")
    torch.manual_seed(0)
    model = transformers.Blip2ForImageTextRetrieval(hf_config()).eval()
    redraw(model, seed=11)
    folder = tmp_path_factory.mktemp("hf_blip2_itm")
    model.save_pretrained(folder, safe_serialization=True)
    assert (folder / "model.safetensors").is_file()
    return str(folder), model


@torch.no_grad()
def hf_features(model, pixels, text):
    out = model(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask,
                use_image_text_matching_head=False)
    return out.image_embeds, out.text_embeds


def lavis_blip2_qformer(state_dict=None):
    """LAVIS's own ``Blip2Qformer`` (ITM head included) at the tiny size, built offline as SPEC §8 says."""
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    vision, qformer = VisionSettings(**VISION), QformerSettings(**QFORMER)

    class TinyBlip2Qformer(Blip2Qformer):
        @classmethod
        def init_tokenizer(cls):
            return build_tokenizer(qformer)

        @classmethod
        def init_vision_encoder(cls, *args, **kwargs):
            return build_vision_encoder(vision)

        @classmethod
        def init_Qformer(cls, num_query_token, vision_width, cross_attention_freq=2):
            return build_qformer(qformer, vision_width, VOCAB_SIZE)

    model = TinyBlip2Qformer(num_query_token=4, cross_attention_freq=2, embed_dim=EMBED_DIM, max_txt_len=16,
                             vit_precision="fp32")
    if state_dict is not None:
        load_checked(model, state_dict, "converted", allowed_missing=("Qformer.cls.",))
    return model.eval()


# ------------------------------------------------------------------------ transformers -> LAVIS
@needs_retrieval
@pytest.mark.parametrize("how", ["converted file", "folder as model.pretrained"])
@pytest.mark.parametrize("build", [cir_model, seps_model], ids=["lever_blip2_cir", "lever_blip2_seps"])
def test_converted_weights_give_transformers_features(hf_folder, tmp_path, how, build):
    folder, hf_model = hf_folder
    if how == "converted file":
        out = tmp_path / "blip2_converted.pth"
        result = CliRunner().invoke(main, ["convert-weights", folder, str(out)])
        assert result.exit_code == 0, result.output
        pretrained = str(out)
    else:
        pretrained = folder
    model = build(pretrained)
    reference = build()  # random weights: the loaded model must differ from them
    pixels = images()
    text = tokens(model)
    ours = our_features(model, pixels, text)
    theirs = hf_features(hf_model, pixels, text)
    assert ours[0].shape == theirs[0].shape == (4, 4, EMBED_DIM) and ours[1].shape == theirs[1].shape == (4, EMBED_DIM)
    torch.testing.assert_close(ours[0], theirs[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours[1], theirs[1], atol=ATOL, rtol=0)
    assert not torch.allclose(our_features(reference, pixels, text)[0], theirs[0], atol=1e-2)


@needs_retrieval
def test_itm_of_lavis_blip2_qformer_on_converted_weights_equals_transformers(hf_folder):
    folder, hf_model = hf_folder
    state_dict, report = convert.load_transformers_folder(folder)
    model = lavis_blip2_qformer(state_dict)
    pixels = images()
    text = tokens(model)
    with torch.no_grad():
        image_embeds = model.ln_vision(model.visual_encoder(pixels))
        ours = model.compute_itm(image_embeds, text.input_ids, text.attention_mask)  # LAVIS: mean_q logit[:, 1]
        theirs = hf_model(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask,
                          use_image_text_matching_head=True).logits_per_image[:, 1]
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
        # and LAVIS's own feature extraction agrees with transformers' ITC features
        features = model.extract_features({"image": pixels, "text_input": TEXTS}, mode="image")
        hf_image = hf_features(hf_model, pixels, text)[0]
        torch.testing.assert_close(features.image_embeds_proj, hf_image, atol=ATOL, rtol=0)


@needs_retrieval
def test_every_transformers_weight_is_accounted_for(hf_folder):
    folder, hf_model = hf_folder
    state_dict, report = convert.load_transformers_folder(folder)
    hf_keys = set(hf_model.state_dict())
    assert report.unused == {}  # a retrieval model maps completely
    assert report.mapped == len(hf_keys)
    assert set(report.filled) == {convert.POSITION_IDS, "temp"}
    assert report.absent_parts == []
    # the redrawn key slice of EVA's qkv bias is reported, not silently lost (it has no effect: softmax)
    assert len(report.exact_drops) == 2 and all("key bias" in d for d in report.exact_drops)
    # every LAVIS Blip2Qformer weight is there except the Q-Former LM head transformers never had
    lavis_keys = set(lavis_blip2_qformer().state_dict())
    assert {k for k in lavis_keys - set(state_dict)} == {k for k in lavis_keys if k.startswith("Qformer.cls.")}
    assert set(state_dict) <= lavis_keys
    text = report.text()
    assert "temp = 0.07" in text and "position_ids" in text


@pytest.mark.parametrize("cls_name", ["Blip2ForConditionalGeneration", "Blip2Model"])
def test_generation_folders_give_the_vision_and_query_branch(tmp_path, cls_name):
    """Needs transformers >= 4.27 (BLIP-2's first release), not the retrieval class (4.45)."""
    if not hasattr(transformers, cls_name):
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    config = hf_config(text_config={"model_type": "opt", "hidden_size": 16, "num_hidden_layers": 1, "ffn_dim": 32,
                                    "num_attention_heads": 2, "vocab_size": 50, "max_position_embeddings": 32,
                                    "word_embed_proj_dim": 16})
    config.qformer_config.use_qformer_text_input = False  # as in the released BLIP-2 OPT/T5 models
    torch.manual_seed(0)
    hf_model = getattr(transformers, cls_name)(config).eval()
    redraw(hf_model, seed=5)
    hf_model.save_pretrained(tmp_path, safe_serialization=HAS_SAFETENSORS)
    state_dict, report = convert.load_transformers_folder(str(tmp_path))
    unused = report.unused_by_reason()
    assert len(unused) == 1
    [(reason, keys)] = unused.items()
    assert "language model" in reason
    assert all(k.startswith(("language_model.", "language_projection.")) for k in keys)
    saved = convert.read_transformers_folder(str(tmp_path))[1]  # lm_head is tied to the embeddings: not saved
    assert report.mapped + len(keys) == len(saved)
    assert any("text embeddings" in part for part in report.absent_parts)
    assert any("text FFN" in part for part in report.absent_parts)
    assert {"vision_proj", "text_proj", "itm_head"} <= set(report.absent_parts)
    # loading it as a retrieval checkpoint fails naming the missing weights
    with pytest.raises(CheckpointMismatch, match=r"weights missing from the checkpoint: .*word_embeddings"):
        cir_model(str(tmp_path))
    # the parts it has compute what transformers computes: Q-Former query outputs over the image
    model = cir_model()
    model.load_state_dict(state_dict, strict=False)
    pixels = images()
    with torch.no_grad():
        vit = model.image_tokens(pixels)
        ours = model.Qformer.bert(query_embeds=model.query_tokens.expand(4, -1, -1), encoder_hidden_states=vit,
                                  encoder_attention_mask=torch.ones(vit.shape[:-1], dtype=torch.long),
                                  return_dict=True).last_hidden_state
        hf_vit = hf_model.vision_model(pixel_values=pixels).last_hidden_state
        theirs = hf_model.qformer(query_embeds=hf_model.query_tokens.expand(4, -1, -1), encoder_hidden_states=hf_vit,
                                  encoder_attention_mask=torch.ones(hf_vit.shape[:-1], dtype=torch.long)).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------ LAVIS -> transformers
def _lavis_checkpoint(tmp_path):
    model = lavis_blip2_qformer()
    redraw(model, seed=3)
    path = tmp_path / "blip2_tiny.pth"
    torch.save({"model": model.state_dict()}, path)
    return model, str(path)


@needs_retrieval
def test_lavis_checkpoint_to_transformers_folder_gives_the_same_features(tmp_path):
    lavis_model, path = _lavis_checkpoint(tmp_path)
    out = tmp_path / "hf"
    result = CliRunner().invoke(main, ["convert-weights", path, str(out), "--vision-heads", "2", "--qformer-heads", "2"])
    assert result.exit_code == 0, result.output
    assert "unused (transformers' Blip2ForImageTextRetrieval has no learnable temperature): 1 tensors: temp" in result.output
    assert "Qformer.cls" in result.output  # the LM head is listed, not dropped silently
    hf_model, info = transformers.Blip2ForImageTextRetrieval.from_pretrained(str(out), output_loading_info=True)
    hf_model.eval()
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    pixels = images()
    text = tokens(lavis_model)
    with torch.no_grad():
        features = lavis_model.extract_features({"image": pixels, "text_input": TEXTS}, mode="image")
        text_hidden = lavis_model.Qformer.bert(text.input_ids, attention_mask=text.attention_mask, return_dict=True)
        lavis_text = F.normalize(lavis_model.text_proj(text_hidden.last_hidden_state[:, 0, :]), dim=-1)
        image_embeds = lavis_model.ln_vision(lavis_model.visual_encoder(pixels))
        lavis_itm = lavis_model.compute_itm(image_embeds, text.input_ids, text.attention_mask)
        hf_image, hf_text = hf_features(hf_model, pixels, text)
        hf_itm = hf_model(pixel_values=pixels, input_ids=text.input_ids, attention_mask=text.attention_mask,
                          use_image_text_matching_head=True).logits_per_image[:, 1]
    torch.testing.assert_close(hf_image, features.image_embeds_proj, atol=ATOL, rtol=0)
    torch.testing.assert_close(hf_text, lavis_text, atol=ATOL, rtol=0)
    torch.testing.assert_close(hf_itm, lavis_itm, atol=ATOL, rtol=0)


def test_lavis_to_folder_to_lavis_round_trips_exactly(tmp_path):
    """Needs no transformers model: runs on the legacy stack too (pytorch_model.bin without safetensors)."""
    lavis_model, path = _lavis_checkpoint(tmp_path)
    original = load_torch_file(path)
    hf_state, config, report = convert.lavis_to_transformers(original, vision_heads=2, qformer_heads=2)
    folder = tmp_path / "hf"
    convert.save_transformers_folder(hf_state, config, str(folder))
    back = load_torch_file(str(folder))  # the one loading path converts the folder in memory
    assert set(report.unused) == {"temp", convert.POSITION_IDS} | {k for k in original if k.startswith("Qformer.cls.")}
    for key, value in original.items():
        if key in report.unused and key != convert.POSITION_IDS:
            assert key not in back or key == "temp"
            continue
        assert torch.equal(back[key], value), key
    assert back["temp"].item() == pytest.approx(convert.LAVIS_TEMP_INIT)
    assert json.loads((folder / "config.json").read_text())["vision_config"]["num_hidden_layers"] == 2
    # a folder in model.pretrained loads into our models and computes what the LAVIS weights compute
    ours = cir_model(str(folder))
    direct = cir_model(path)
    pixels = images()
    text = tokens(ours)
    for mine, theirs in zip(our_features(ours, pixels, text), our_features(direct, pixels, text)):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)


def test_config_derived_from_the_weights_and_recipe_sizes(tmp_path):
    model = cir_model()
    hf_state, config, _ = convert.lavis_to_transformers(model.state_dict(), vision_heads=2, qformer_heads=2)
    vision, qformer = config["vision_config"], config["qformer_config"]
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["image_size"], vision["patch_size"],
            vision["intermediate_size"]) == (32, 2, 32, 8, 64)
    assert (qformer["num_hidden_layers"], qformer["cross_attention_frequency"], qformer["vocab_size"],
            qformer["max_position_embeddings"], qformer["encoder_hidden_size"], qformer["intermediate_size"]) == (
        3, 2, VOCAB_SIZE, 40, 32, 48)
    assert config["num_query_tokens"] == 4 and config["image_text_hidden_size"] == EMBED_DIM
    sizes = convert.recipe_settings_for(config)
    assert sizes["vision"] == {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
    assert sizes["qformer"]["cross_attention_freq"] == 2 and sizes["embed_dim"] == EMBED_DIM
    # EVA ViT-g: 6144 hidden units come back as LAVIS's mlp_ratio 4.3637 (int(1408 * 4.3637) == 6144)
    vitg = convert.recipe_settings_for({"vision_config": {"hidden_size": 1408, "intermediate_size": 6144,
                                                          "num_hidden_layers": 39, "num_attention_heads": 16}})
    assert vitg["vision"]["mlp_ratio"] == 4.3637 and vitg["vision"]["depth"] == 39
    with pytest.raises(convert.ConversionError, match=r"attention heads are not in the weights; give --vision-heads"):
        convert.lavis_to_transformers(model.state_dict())
    # the CIR model's own keys have no transformers counterpart and are listed
    _, _, report = convert.lavis_to_transformers(model.state_dict(), vision_heads=2, qformer_heads=2)
    assert "prompt_tokens" in report.unused and any("itm_head" in part for part in report.absent_parts)


def test_every_lavis_key_maps_back_and_forth():
    keys = list(lavis_blip2_qformer().state_dict())
    for key in keys:
        if key.startswith("Qformer.cls.") or key in ("temp", convert.POSITION_IDS) or key.endswith(("q_bias", "v_bias")):
            continue
        hf_key = convert.lavis_key_to_transformers(key)
        assert hf_key is not None, key
        assert convert.transformers_key_to_lavis(hf_key) == key


# ------------------------------------------------------------------------ errors
def test_not_a_blip2_folder_is_a_one_line_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointMismatch, match=r"empty: not a transformers model folder \(no config.json\)$"):
        load_torch_file(str(empty))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(CheckpointMismatch, match=r"not a transformers BLIP-2 folder \(config.json has model_type 'bert'"):
        load_torch_file(str(bert))
    blip2 = tmp_path / "blip2"
    blip2.mkdir()
    (blip2 / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    with pytest.raises(CheckpointMismatch, match=r"no weights next to config.json \(expected one of model.safetensors"):
        load_torch_file(str(blip2))
    (blip2 / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(CheckpointMismatch, match=r"shard model-00001.safetensors is missing"):
        load_torch_file(str(blip2))
    with pytest.raises(CheckpointMismatch) as info:
        cir_model(str(empty))
    assert "\n" not in str(info.value)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    runner = CliRunner()
    result = runner.invoke(main, ["convert-weights", str(empty), str(tmp_path / "out.pth")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == f"error: {empty}: not a transformers model folder (no config.json)"
    (tmp_path / "out.pth").write_bytes(b"x")
    exists = runner.invoke(main, ["convert-weights", str(empty), str(tmp_path / "out.pth")])
    assert exists.exit_code == 2 and "already exists (pass --force" in exists.output


def test_validate_accepts_a_folder_for_pretrained_and_names_a_bad_one(tmp_path):
    from lever_plugins.recipes import load_recipe

    demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "demo", "cirr_gated.yaml")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert load_recipe(demo, [f"model.pretrained={folder}"], check_paths=True) is not None
    (folder / "config.json").unlink()
    from lever_plugins.schema import RecipeError

    with pytest.raises(RecipeError, match=r"model.pretrained: .* is a folder without config.json \(expected a checkpoint"):
        load_recipe(demo, [f"model.pretrained={folder}"], check_paths=True)
    with pytest.raises(RecipeError, match=r"model.pretrained: file not found: "):
        load_recipe(demo, [f"model.pretrained={tmp_path}/none.pth"], check_paths=True)


def test_a_settings_mismatch_is_named_not_a_traceback(tmp_path):
    _, path = _lavis_checkpoint(tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"weights of another shape than this model's .*model.qformer"):
        cir_model(path, qformer={**QFORMER, "intermediate_size": 40})


def test_a_vit_without_qkv_bias_gets_zero_biases_and_the_report_says_so():
    model = cir_model()
    hf_state, _, _ = convert.lavis_to_transformers(model.state_dict(), vision_heads=2, qformer_heads=2)
    without = {k: v for k, v in hf_state.items() if not k.endswith("self_attn.qkv.bias")}
    state_dict, report = convert.transformers_to_lavis(without)
    for block in range(2):
        for name in ("q_bias", "v_bias"):
            key = f"visual_encoder.blocks.{block}.attn.{name}"
            assert torch.equal(state_dict[key], torch.zeros(32)) and "no qkv bias" in report.filled[key]
    assert report.unused == {} and report.absent_parts == ["itm_head"]
