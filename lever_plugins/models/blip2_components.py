"""BLIP-2 building blocks from explicit settings and local files only (no hub, no URL).

LAVIS's ``Blip2Base`` builders call ``BertTokenizer.from_pretrained("bert-base-uncased")``,
``BertConfig.from_pretrained(...)`` and ``create_eva_vit_g`` (which downloads ``eva_vit_g.pth``). Our
models build the same LAVIS modules from :mod:`lever_plugins.schemas.blip2` settings instead, so a
tiny model builds offline in milliseconds and the full one loads every weight from a local path.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from lever_plugins.compat import import_lavis
from lever_plugins.checkpoints import (  # noqa: F401  (re-exported for tests and plugin code)
    BLIP2_UNUSED_KEYS,
    CheckpointMismatch,
    load_checked,
    load_torch_file,
)
from lever_plugins.schema import expand_path
from lever_plugins.schemas.blip2 import QformerSettings, VisionSettings

import_lavis()

from lavis.models.base_model import BaseModel  # noqa: E402
from lavis.models.blip2_models.blip2 import LayerNorm  # noqa: E402
from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel  # noqa: E402
from lavis.models.eva_vit import VisionTransformer, convert_weights_to_fp16, interpolate_pos_embed  # noqa: E402
from transformers import BertTokenizer  # noqa: E402

logger = logging.getLogger(__name__)


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


PrefixLayout = Literal["before_text", "after_cls"]


def image_free_pass(
    qformer: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix_embeds: torch.Tensor,
    layout: PrefixLayout,
) -> torch.Tensor:
    """A Q-Former pass over a prefix of embeddings and a text, with no image, as SPRC's Q-Former runs it.

    SPRC's Q-Former (a modified copy of LAVIS's) sends **every** position of a pass without image
    features through the text FFN (``intermediate``/``output``), query positions included; stock LAVIS
    would send the prefix through the query FFN. Running LAVIS's own encoder with ``query_length=0``
    gives SPRC's computation without editing LAVIS. The two layouts SPRC uses:

    * ``before_text``: ``[prefix, text]``, position embeddings on the text only (the second fusion pass:
      the fused query outputs as a prompt; read the text [CLS] at index ``P``);
    * ``after_cls``: ``[CLS, prefix, text[1:]]``, position embeddings over the whole sequence (SPRC's
      ``no_img`` rtc pass with the learnable prompts; read index 0). The mask ``[ones(P), text_mask]``
      lines up with this sequence because the text keeps its order after the moved [CLS].

    Args:
        input_ids: ``(B, L)`` text token ids; ``attention_mask``: ``(B, P + L)``, prefix first.
        prefix_embeds: ``(B, P, H)``.

    Returns:
        ``(B, P + L, H)`` last hidden states.
    """
    embeddings = qformer.bert.embeddings
    words = embeddings.word_embeddings(input_ids)
    num_prefix, num_text = prefix_embeds.shape[1], input_ids.shape[1]
    if layout == "before_text":
        positions = embeddings.position_embeddings(embeddings.position_ids[:, :num_text])
        sequence = torch.cat([prefix_embeds, words + positions], dim=1)
    elif layout == "after_cls":
        positions = embeddings.position_embeddings(embeddings.position_ids[:, : num_prefix + num_text])
        sequence = torch.cat([words[:, :1], prefix_embeds, words[:, 1:]], dim=1) + positions
    else:
        raise ValueError(f"image_free_pass: layout must be 'before_text' or 'after_cls', got {layout!r}")
    hidden = embeddings.dropout(embeddings.LayerNorm(sequence))
    extended_mask = qformer.bert.get_extended_attention_mask(attention_mask, hidden.shape[:-1], hidden.device, False)
    output = qformer.bert.encoder(hidden, attention_mask=extended_mask, return_dict=True, query_length=0)
    return output.last_hidden_state


def freeze(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad = False
    module.eval()


class Blip2PluginModel(BaseModel):
    """What our BLIP-2-based LAVIS models share: validated ``from_config``, a frozen ViT that stays in
    eval mode, and checkpoint loading (``pretrained`` then ``finetuned``) that never hides missing weights.

    Subclasses set ``self.settings`` (with ``vision``, ``pretrained``, ``finetuned``) and implement
    :meth:`load_pretrained`. A ``finetuned`` checkpoint (ours, or SPRC's ``{"epoch", "<class>": ...}``)
    loads strictly: every weight present, no weight of another configuration, except the BLIP-2 heads
    we drop and, when the checkpoint has none of them, the weights of ``OPTIONAL_PLUGIN_KEYS`` (a
    baseline checkpoint starting a plugin run; plugins are the identity at initialisation).
    """

    OPTIONAL_PLUGIN_KEYS: tuple[str, ...] = ()

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
            state_dict = load_torch_file(self.settings.finetuned)
            allowed = self._frozen_keys()
            plugin_keys = self.OPTIONAL_PLUGIN_KEYS
            if plugin_keys and not any(key.startswith(plugin_keys) for key in state_dict):
                allowed += plugin_keys
            load_checked(self, state_dict, self.settings.finetuned, allowed_missing=allowed,
                         ignored_unexpected=BLIP2_UNUSED_KEYS, refuse_unexpected=True)

    def _frozen_keys(self) -> tuple[str, ...]:
        # Runner checkpoints omit frozen weights (as LAVIS's do), so they may be missing there.
        return ("visual_encoder.",) if self.settings.vision.freeze else ()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.settings.vision.freeze:
            self.visual_encoder.eval()  # a frozen ViT keeps its eval behaviour (drop-path off)
        return self

