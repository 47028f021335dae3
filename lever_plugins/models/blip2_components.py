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
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lever_plugins.compat import import_lavis
from lever_plugins.checkpoints import CheckpointMismatch, load_checked
from lever_plugins.models.convert_blip2 import ConversionError, read_checkpoint
from lever_plugins.schema import expand_path
from lever_plugins.schemas.blip2 import QformerSettings, VisionSettings

import_lavis()

from lavis.models.base_model import BaseModel  # noqa: E402
from lavis.models.blip2_models.blip2 import LayerNorm  # noqa: E402
from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel  # noqa: E402
from lavis.models.eva_vit import VisionTransformer, convert_weights_to_fp16, interpolate_pos_embed  # noqa: E402
from transformers import BertTokenizer  # noqa: E402

logger = logging.getLogger(__name__)

# BLIP-2 checkpoint weights our retrieval models do not use: the ITM head and the Q-Former's
# language-model head (retrieval never generates text; under DDP it would hold weights that never get a
# gradient).
BLIP2_UNUSED_KEYS = ("itm_head.", "Qformer.cls.")
# the settings that decide a BLIP-2 weight's shape (named when a checkpoint's shapes differ)
BLIP2_SHAPE_SETTINGS = "model.vision / model.qformer / embed_dim"


def load_torch_file(path: str) -> dict:
    """A LAVIS-layout state dict from a checkpoint file (``weights_only=True``: no pickled code) or a
    transformers BLIP-2 folder (``config.json`` + safetensors/bin), converted in memory.

    The one state-dict loading path of our models; see :func:`lever_plugins.models.convert_blip2.read_checkpoint`.
    """
    try:
        return read_checkpoint(path)
    except ConversionError as exc:
        raise CheckpointMismatch(str(exc)) from None


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
        load_checked(encoder, state_dict, settings.checkpoint, ignored_unexpected=("blocks.", "head.", "norm.", "fc_norm."),
                 shape_settings=BLIP2_SHAPE_SETTINGS)
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
    """What our BLIP-2-based LAVIS models share: the BLIP-2 backbone, validated ``from_config``, a frozen
    ViT that stays in eval mode, and checkpoint loading (``pretrained`` then ``finetuned``) that never
    hides missing weights.

    Build one from settings (``Model(settings)``) or from a recipe's ``model:`` block
    (``Model.from_config(cfg)``, as LAVIS does).

    A subclass's ``__init__`` calls :meth:`build_backbone` first, adds its own modules, then calls
    :meth:`load_checkpoints`. ``NEW_KEYS``: key prefixes of its own weights (a BLIP-2 checkpoint has none
    of them). A ``finetuned`` checkpoint (ours, or SPRC's ``{"epoch", "<class>": ...}``) loads strictly:
    every weight present, no weight of another configuration, except the BLIP-2 heads we drop and, when
    the checkpoint has none of them, the weights of ``OPTIONAL_PLUGIN_KEYS`` (a baseline checkpoint
    starting a plugin run; plugins are the identity at initialisation).
    """

    ARCH: str = ""  # the LAVIS registry name (catalog row), for error messages
    NEW_KEYS: tuple[str, ...] = ()
    OPTIONAL_PLUGIN_KEYS: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: Any):
        """Build from a LAVIS/OmegaConf ``model:`` node or a plain mapping; every key is validated."""
        from lever_plugins.recipes import model_settings_from_config

        return cls(model_settings_from_config(cfg))

    def example_images(self, batch_size: int, seed: int) -> torch.Tensor:
        """``(batch_size, 3, S, S)`` random pixels at this model's image size (for :meth:`example_samples`)."""
        size = self.settings.vision.image_size
        return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))

    # ----------------------------------------------------------------------------------- building
    def build_backbone(self, settings: Any) -> None:
        """Set ``self.settings`` and the BLIP-2 parts: tokenizer, ViT + ``ln_vision`` (frozen with
        ``vision.freeze``), Q-Former + ``query_tokens`` (query FFN copied from the text FFN, LM head
        dropped), ``vision_proj`` / ``text_proj`` (``hidden_size -> embed_dim``) and the ITC ``temp``.

        The order is fixed: it decides the random initialisation and the state-dict order.
        """
        problems = list(settings.problems())
        if problems:
            raise ValueError(f"{self.ARCH}: " + "; ".join(problems))
        self.settings = settings
        self.tokenizer = build_tokenizer(settings.qformer)
        self.visual_encoder, self.ln_vision = build_vision_encoder(settings.vision)
        if settings.vision.freeze:
            freeze(self.visual_encoder)
        self.Qformer, self.query_tokens = build_qformer(settings.qformer, settings.vision.width, len(self.tokenizer))
        init_query_branch_from_text(self.Qformer)
        self.Qformer.cls = None  # retrieval never generates text
        hidden = settings.qformer.hidden_size
        self.vision_proj = nn.Linear(hidden, settings.embed_dim)
        self.text_proj = nn.Linear(hidden, settings.embed_dim)
        self.temp = nn.Parameter(settings.temperature_init * torch.ones([]))
        self.max_txt_len = settings.max_txt_len
        # contrastive negatives from all ranks under torch.distributed (the task sets run.gather_negatives)
        self.gather_negatives = True

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
            load_checked(self, state_dict, self.settings.finetuned, allowed_missing=allowed, shape_settings=BLIP2_SHAPE_SETTINGS,
                         ignored_unexpected=BLIP2_UNUSED_KEYS, refuse_unexpected=True)

    def load_pretrained(self, path: str) -> None:
        """Load a BLIP-2 checkpoint; only ``NEW_KEYS``, the plugin's and (when loaded on its own,
        ``vision.checkpoint``) the ViT's weights may be missing.

        A ViT position embedding of another resolution (BLIP-2 pretrains at 224 px) is interpolated to
        ``vision.image_size``, as LAVIS does for its 364-px retrieval models.
        """
        state_dict = dict(load_torch_file(path))
        key = "visual_encoder.pos_embed"
        if key in state_dict and state_dict[key].shape != self.visual_encoder.pos_embed.shape:
            resized = {"pos_embed": state_dict[key]}
            interpolate_pos_embed(self.visual_encoder, resized)
            state_dict[key] = resized["pos_embed"]
        allowed = self.NEW_KEYS + self.OPTIONAL_PLUGIN_KEYS
        if self.settings.vision.checkpoint:
            allowed += ("visual_encoder.",)
        load_checked(self, state_dict, path, allowed_missing=allowed, ignored_unexpected=BLIP2_UNUSED_KEYS,
                     shape_settings=BLIP2_SHAPE_SETTINGS)

    def _frozen_keys(self) -> tuple[str, ...]:
        # Runner checkpoints omit frozen weights (as LAVIS's do), so they may be missing there.
        return ("visual_encoder.",) if self.settings.vision.freeze else ()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.settings.vision.freeze:
            self.visual_encoder.eval()  # a frozen ViT keeps its eval behaviour (drop-path off)
        return self

    # ----------------------------------------------------------------------------------- encoders
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, 1 + N, vision.width)``: ViT + ``ln_vision`` (no grad when frozen)."""
        size = self.settings.vision.image_size
        if images.dim() != 4 or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"{self.ARCH}: images must be (B, 3, {size}, {size}) for model.vision.image_size={size}, got "
                f"shape {tuple(images.shape)}; set the dataset's image_size to {size}"
            )
        context = torch.no_grad() if self.settings.vision.freeze else contextlib.nullcontext()
        # An fp16 ViT (vision.precision, on cuda) gets fp16 pixels, so it also runs without run.amp.
        dtype = self.visual_encoder.patch_embed.proj.weight.dtype
        with context:
            tokens = self.visual_encoder(images.to(self.device, dtype=dtype))
        return self.ln_vision(tokens.float() if tokens.dtype != torch.float32 else tokens)

    def query_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """BLIP-2's image features: the query tokens over ``image_embeds`` ``(B, N, vision.width)`` ->
        ``vision_proj`` -> ``(B, Q, embed_dim)``, L2-normalised."""
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        output = self.Qformer.bert(
            query_embeds=query_tokens, encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, return_dict=True
        )
        return F.normalize(self.vision_proj(output.last_hidden_state), dim=-1)
