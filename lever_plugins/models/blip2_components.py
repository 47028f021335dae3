"""BLIP-2 building blocks from explicit settings and local files only (no hub, no URL).

LAVIS's ``Blip2Base`` builders call ``BertTokenizer.from_pretrained("bert-base-uncased")``,
``BertConfig.from_pretrained(...)`` and ``create_eva_vit_g`` (which downloads ``eva_vit_g.pth``). Our
models build the same LAVIS modules from :mod:`lever_plugins.schemas.blip2` settings instead, so a
tiny model builds offline in milliseconds and the full one loads every weight from a local path.
"""
from __future__ import annotations

import contextlib
import logging
from functools import partial
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from lever_plugins.compat import import_lavis
from lever_plugins.schema import expand_path
from lever_plugins.schemas.blip2 import QformerSettings, VisionSettings

import_lavis()

from lavis.models.base_model import BaseModel  # noqa: E402
from lavis.models.blip2_models.blip2 import LayerNorm  # noqa: E402
from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel  # noqa: E402
from lavis.models.eva_vit import VisionTransformer, convert_weights_to_fp16, interpolate_pos_embed  # noqa: E402
from transformers import BertTokenizer  # noqa: E402

logger = logging.getLogger(__name__)


class CheckpointMismatch(RuntimeError):
    """A checkpoint lacks weights that the model needs (beyond the keys allowed to be new)."""


def load_torch_file(path: str) -> dict:
    """Load a checkpoint with ``weights_only=True`` (no pickled code); return its state dict."""
    resolved = expand_path(path)
    try:
        checkpoint = torch.load(resolved, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointMismatch(f"{path}: checkpoint file not found") from None
    except Exception as exc:  # unpickling refused or corrupt file
        raise CheckpointMismatch(f"{path}: cannot load as a weights-only torch checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        return checkpoint["model"]
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        return checkpoint["state_dict"]
    if isinstance(checkpoint, dict):
        return checkpoint
    raise CheckpointMismatch(f"{path}: expected a state dict or a dict with 'model', got {type(checkpoint).__name__}")


def load_checked(
    module: nn.Module,
    state_dict: dict,
    source: str,
    allowed_missing: Iterable[str] = (),
    ignored_unexpected: Iterable[str] = (),
) -> tuple[list[str], list[str]]:
    """``load_state_dict(strict=False)`` that refuses to hide missing weights.

    Args:
        allowed_missing: key prefixes that may be absent (weights new in this model, e.g. a plugin).
        ignored_unexpected: key prefixes of the checkpoint this model does not use (e.g. BLIP-2's ITM head).

    Returns:
        ``(missing, unexpected)`` after the allowances; raises :class:`CheckpointMismatch` if any other
        key is missing. Unexpected keys are logged, not fatal.
    """
    allowed_missing, ignored_unexpected = tuple(allowed_missing), tuple(ignored_unexpected)
    result = module.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(allowed_missing)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(ignored_unexpected)]
    new_keys = [k for k in result.missing_keys if k.startswith(allowed_missing)]
    if new_keys:
        logger.info("%s: %d keys new in this model (not in the checkpoint): %s", source, len(new_keys), _summarise(new_keys))
    if unexpected:
        logger.warning("%s: %d unexpected keys ignored: %s", source, len(unexpected), _summarise(unexpected))
    if missing:
        raise CheckpointMismatch(f"{source}: {len(missing)} weights missing from the checkpoint: {_summarise(missing)}")
    return missing, unexpected


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def build_tokenizer(settings: QformerSettings) -> BertTokenizer:
    """WordPiece tokenizer from a local vocab file, with BLIP-2's extra ``[DEC]`` bos token."""
    tokenizer = BertTokenizer(vocab_file=expand_path(settings.vocab_file), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def build_vision_encoder(settings: VisionSettings) -> tuple[nn.Module, nn.Module]:
    """LAVIS's EVA ``VisionTransformer`` at the given size + the BLIP-2 ``ln_vision`` LayerNorm."""
    encoder = VisionTransformer(
        img_size=settings.image_size,
        patch_size=settings.patch_size,
        use_mean_pooling=False,
        embed_dim=settings.width,
        depth=settings.depth,
        num_heads=settings.num_heads,
        mlp_ratio=settings.mlp_ratio,
        qkv_bias=True,
        drop_path_rate=settings.drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_checkpoint=settings.use_grad_checkpoint,
    )
    if settings.checkpoint:
        state_dict = load_torch_file(settings.checkpoint)
        interpolate_pos_embed(encoder, state_dict)
        # LAVIS drops EVA's last block and its head/norm; those checkpoint keys are expected extras.
        load_checked(encoder, state_dict, settings.checkpoint, ignored_unexpected=("blocks.", "head.", "norm.", "fc_norm."))
    if settings.precision == "fp16" and torch.cuda.is_available():
        convert_weights_to_fp16(encoder)
    return encoder, LayerNorm(settings.width)


def build_qformer(settings: QformerSettings, vision_width: int, vocab_size: int) -> tuple[nn.Module, nn.Parameter]:
    """LAVIS ``BertLMHeadModel`` Q-Former from explicit dims (+ optional local BERT weights)."""
    config = BertConfig.from_dict(
        {
            "vocab_size": vocab_size,
            "hidden_size": settings.hidden_size,
            "num_hidden_layers": settings.num_hidden_layers,
            "num_attention_heads": settings.num_attention_heads,
            "intermediate_size": settings.intermediate_size,
            "hidden_act": "gelu",
            "hidden_dropout_prob": settings.hidden_dropout_prob,
            "attention_probs_dropout_prob": settings.attention_probs_dropout_prob,
            "max_position_embeddings": settings.max_position_embeddings,
            "type_vocab_size": 2,
            "initializer_range": settings.initializer_range,
            "layer_norm_eps": 1e-12,
            "pad_token_id": 0,
            "position_embedding_type": "absolute",
        }
    )
    config.encoder_width = vision_width
    config.add_cross_attention = True
    config.cross_attention_freq = settings.cross_attention_freq
    config.query_length = settings.num_query_token
    if settings.bert_checkpoint:
        qformer = BertLMHeadModel.from_pretrained(expand_path(settings.bert_checkpoint), config=config, local_files_only=True)
    else:
        qformer = BertLMHeadModel(config)
    query_tokens = nn.Parameter(torch.zeros(1, settings.num_query_token, settings.hidden_size))
    query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
    return qformer, query_tokens


def init_query_branch_from_text(qformer: nn.Module) -> None:
    """BLIP-2 starts the query-only FFN weights (``*_query``) as copies of the text FFN weights."""
    state_dict = qformer.state_dict()
    for name, param in qformer.named_parameters():
        if "_query" in name:
            param.data.copy_(state_dict[name.replace("_query", "")])


@contextlib.contextmanager
def without_cross_attention(qformer: nn.Module) -> Iterator[None]:
    """Run Q-Former passes with query tokens but no image (SPRC's prompt/text passes).

    LAVIS's ``BertLayer`` cross-attends whenever query tokens are present and the layer has a
    cross-attention block; it reads ``has_cross_attention`` at call time, so switching that flag off
    for the duration of a pass skips the image without editing LAVIS.
    """
    layers = [layer for layer in qformer.bert.encoder.layer if getattr(layer, "has_cross_attention", False)]
    for layer in layers:
        layer.has_cross_attention = False
    try:
        yield
    finally:
        for layer in layers:
            layer.has_cross_attention = True


def freeze(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad = False
    module.eval()


def trainable_parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def optional_path(value: Optional[str]) -> Optional[str]:
    return expand_path(value) if value else None


class Blip2PluginModel(BaseModel):
    """What our BLIP-2-based LAVIS models share: validated ``from_config``, a frozen ViT that stays in
    eval mode, and checkpoint loading (``pretrained`` then ``finetuned``) that never hides missing weights.

    Subclasses set ``self.settings`` (with ``vision``, ``pretrained``, ``finetuned``) and implement
    :meth:`load_pretrained`.
    """

    @classmethod
    def from_config(cls, cfg: Any):
        """Build from a LAVIS/OmegaConf ``model:`` node or a plain mapping; every key is validated."""
        from lever_plugins.recipes import model_settings_from_config

        return cls(model_settings_from_config(cfg))

    def load_pretrained(self, path: str) -> None:
        raise NotImplementedError

    def load_checkpoints(self) -> None:
        """Load ``settings.pretrained`` (a BLIP-2 checkpoint), then ``settings.finetuned`` (one of ours)."""
        if self.settings.pretrained:
            self.load_pretrained(self.settings.pretrained)
        if self.settings.finetuned:
            load_checked(self, load_torch_file(self.settings.finetuned), self.settings.finetuned,
                         allowed_missing=self._frozen_keys())

    def _frozen_keys(self) -> tuple[str, ...]:
        # Runner checkpoints omit frozen weights (as LAVIS's do), so they may be missing there.
        return ("visual_encoder.",) if self.settings.vision.freeze else ()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.settings.vision.freeze:
            self.visual_encoder.eval()  # a frozen ViT keeps its eval behaviour (drop-path off)
        return self

