"""Settings of the composed-image-retrieval model, dataset and task (recipe ``model:``, ``datasets:``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Optional

from lever_plugins.schema import Settings, setting
from lever_plugins.schemas.blip2 import QformerSettings, VisionSettings
from lever_plugins.schemas.gated_fusion import GatedFusionSettings
from lever_plugins.schemas.run import RunSettings


@dataclass(kw_only=True)
class Blip2CirSettings(Settings):
    """``model:`` block of ``arch: lever_blip2_cir`` (SPRC-style BLIP-2 Q-Former CIR model)."""

    arch: Literal["lever_blip2_cir"] = setting(help="registered model name")
    model_type: str = setting(help="size preset: tiny | pretrain (YAML under lever_plugins/configs/models)")
    vision: VisionSettings = setting(default_factory=VisionSettings, help="image encoder")
    qformer: QformerSettings = setting(default_factory=QformerSettings, help="Q-Former")
    embed_dim: int = setting(256, help="retrieval embedding size (vision_proj / text_proj)", ge=1)
    max_txt_len: int = setting(32, help="modification-text tokens (truncated)", ge=1)
    temperature_init: float = setting(0.07, help="initial learnable contrastive temperature", gt=0)
    loss_rtc_weight: float = setting(0.4, help="weight of the prompt-only text-to-target loss (SPRC rtc)", ge=0)
    loss_align_weight: float = setting(0.4, help="weight of the fused-query/prompt alignment MSE (SPRC align)", ge=0)
    use_gated_fusion: bool = setting(False, help="apply GatedFusionModule to the reference-image tokens")
    gated_fusion: GatedFusionSettings = setting(default_factory=GatedFusionSettings, help="GatedFusionModule settings")
    pretrained: Optional[str] = setting(
        None, help="local BLIP-2 checkpoint (e.g. blip2_pretrained.pth); only plugin/CIR-new keys may be missing", path="file"
    )
    finetuned: Optional[str] = setting(None, help="local checkpoint of this model to load after `pretrained`", path="file")

    def extra_problems(self) -> Iterator[str]:
        if self.max_txt_len > self.qformer.max_position_embeddings:
            yield (f"max_txt_len: {self.max_txt_len} exceeds qformer.max_position_embeddings "
                   f"({self.qformer.max_position_embeddings}), the text positions the Q-Former has")


@dataclass(kw_only=True)
class CirrDatasetSettings(Settings):
    """``datasets.lever_cirr`` block: CIRR in its released layout (or the generated demo)."""

    data_type: Literal["images"] = setting("images", help="LAVIS data type (always images)")
    root: str = setting(help="CIRR root holding captions/, image_splits/ and the image folders", path="dir")
    image_size: int = setting(224, help="image resolution after the target-pad transform", ge=8)
    target_ratio: float = setting(1.25, help="target-pad aspect ratio (SPRC/CLIP4Cir: 1.25)", ge=1)
    generate_demo: bool = setting(False, help="generate the embedded shapes demo into `root` if it is not there")
    max_train_samples: Optional[int] = setting(None, help="use only the first N training triplets (smoke runs)", ge=1)
    max_eval_samples: Optional[int] = setting(None, help="use only the first N val/test triplets (smoke runs)", ge=1)
    splits: list[Literal["train", "val", "test1"]] = setting(
        default_factory=lambda: ["train", "val"], help="splits to build (test1 has no targets: export only)"
    )


@dataclass(kw_only=True)
class ComposedRetrievalRunSettings(RunSettings):
    """``run:`` block for ``task: lever_composed_retrieval``: the common keys plus these."""

    save_gate_maps: int = setting(
        0, help="after training, save gate heat-maps (PNG) for the first N val queries (needs use_gated_fusion)", ge=0
    )
