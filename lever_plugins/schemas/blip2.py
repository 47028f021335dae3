"""Settings of the BLIP-2 building blocks shared by our models: EVA ViT, Q-Former, tokenizer.

Sizes are data (OpenCLIP-style): ``model_type: tiny`` and ``model_type: pretrain`` are YAML files under
``lever_plugins/configs/models/`` filling these blocks, not branches in code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Optional

from lever_plugins.schema import Settings, setting


@dataclass(kw_only=True)
class VisionSettings(Settings):
    """EVA-style ViT (LAVIS ``eva_vit.VisionTransformer``); ViT-g is width 1408, depth 39, 16 heads."""

    image_size: int = setting(224, help="input resolution in pixels", ge=8)
    patch_size: int = setting(14, help="patch size in pixels", ge=1)
    width: int = setting(1408, help="token width (1408 for EVA ViT-g)", ge=1)
    depth: int = setting(39, help="transformer blocks (39 for EVA ViT-g; LAVIS drops the last of 40)", ge=1)
    num_heads: int = setting(16, help="attention heads", ge=1)
    mlp_ratio: float = setting(4.3637, help="MLP hidden size / width", gt=0)
    drop_path_rate: float = setting(0.0, help="stochastic depth", ge=0, lt=1)
    use_grad_checkpoint: bool = setting(False, help="activation checkpointing in the ViT")
    precision: Literal["fp16", "fp32"] = setting("fp16", help="ViT weight precision (fp16 is converted only on cuda)")
    freeze: bool = setting(True, help="freeze the ViT (BLIP-2 and SPRC train with it frozen)")
    checkpoint: Optional[str] = setting(
        None, help="local EVA ViT-g weights (eva_vit_g.pth); null: random init or from `pretrained`", path="file"
    )

    def extra_problems(self) -> Iterator[str]:
        if self.image_size % self.patch_size:
            yield f"image_size: must be a multiple of patch_size ({self.patch_size}), got {self.image_size}"
        if self.width % self.num_heads:
            yield f"num_heads: must divide width ({self.width}), got {self.num_heads}"


@dataclass(kw_only=True)
class QformerSettings(Settings):
    """Q-Former (LAVIS ``Qformer.BertLMHeadModel``) dimensions; BERT-base for real BLIP-2."""

    hidden_size: int = setting(768, help="BERT hidden size", ge=1)
    num_hidden_layers: int = setting(12, help="BERT layers", ge=1)
    num_attention_heads: int = setting(12, help="BERT heads", ge=1)
    intermediate_size: int = setting(3072, help="BERT MLP size", ge=1)
    max_position_embeddings: int = setting(512, help="BERT positions", ge=1)
    hidden_dropout_prob: float = setting(0.1, help="BERT dropout", ge=0, lt=1)
    attention_probs_dropout_prob: float = setting(0.1, help="BERT attention dropout", ge=0, lt=1)
    initializer_range: float = setting(0.02, help="std of the random init (BERT: 0.02; larger helps tiny models trained from scratch)", gt=0)
    cross_attention_freq: int = setting(2, help="a cross-attention layer every N layers", ge=1)
    num_query_token: int = setting(32, help="learned query tokens", ge=1)
    vocab_file: Optional[str] = setting(
        None, help="local WordPiece vocab.txt (bert-base-uncased for real weights); required", path="file"
    )
    bert_checkpoint: Optional[str] = setting(
        None, help="local dir of bert-base-uncased weights to initialise the Q-Former (null: random / from `pretrained`)",
        path="dir",
    )

    def extra_problems(self) -> Iterator[str]:
        if self.hidden_size % self.num_attention_heads:
            yield f"num_attention_heads: must divide hidden_size ({self.hidden_size}), got {self.num_attention_heads}"
        if self.vocab_file is None:
            yield "vocab_file: required (a local WordPiece vocab.txt; nothing is downloaded)"
