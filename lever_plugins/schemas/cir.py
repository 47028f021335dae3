"""Settings of the composed-image-retrieval model, dataset and task (recipe ``model:``, ``datasets:``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Optional

from lever_plugins.schema import Settings, setting
from lever_plugins.schemas.blip2 import QformerSettings, VisionSettings
from lever_plugins.schemas.gated_fusion import GatedFusionSettings
from lever_plugins.schemas.run import RunSettings, lr_scale_problem


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
    gated_fusion_lr_scale: float = setting(
        1.0, help="the plugin's learning rate = run.init_lr x this (its alpha starts at 0 and barely moves at "
        "SPRC's 1e-5); needs run.lr_sched lever_onecycle_lr or lever_multistep_lr", gt=0
    )
    decay_all_parameters: bool = setting(
        True, help="AdamW weight decay on every trainable weight, biases, norms and prompts included, as SPRC's "
        "single parameter group (false: LAVIS's rule, no decay on biases, norms and 1-d weights); the "
        "plugin's alpha is never decayed"
    )
    pretrained: Optional[str] = setting(
        None, help="local BLIP-2 checkpoint (e.g. blip2_pretrained.pth); only plugin/CIR-new keys may be missing",
        path="checkpoint",  # or a transformers BLIP-2 folder, converted on load
    )
    finetuned: Optional[str] = setting(None, help="local checkpoint of this model to load after `pretrained`", path="file")

    def extra_problems(self) -> Iterator[str]:
        # SPRC's rtc pass gives positions to the prompts too: [CLS, prompts, text[1:]].
        positions = self.max_txt_len + self.qformer.num_query_token
        if positions > self.qformer.max_position_embeddings:
            yield (f"max_txt_len: {self.max_txt_len} text tokens + {self.qformer.num_query_token} prompt tokens "
                   f"exceed qformer.max_position_embeddings ({self.qformer.max_position_embeddings}), the positions "
                   "the Q-Former has (SPRC's prompt-text pass places the prompts among the text positions)")


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
    caption_processor: Literal["blip_caption", "none"] = setting(
        "blip_caption", help="caption text processing in training and evaluation: BLIP's eval caption processor "
        "(lower case, punctuation stripped, 50 words; what SPRC applies) or none"
    )
    splits: list[Literal["train", "val", "test1"]] = setting(
        default_factory=lambda: ["train", "val"], help="splits to build (test1 has no targets: export only)"
    )


@dataclass(kw_only=True)
class ComposedRetrievalRunSettings(RunSettings):
    """``run:`` block for ``task: lever_composed_retrieval``: the common keys plus these."""

    save_gate_maps: int = setting(
        0, help="after training, save gate heat-maps (PNG) for the first N val queries (needs use_gated_fusion)", ge=0
    )


@dataclass(kw_only=True)
class FashionIQDatasetSettings(Settings):
    """``datasets.lever_fashioniq`` block: FashionIQ in its released layout (captions/, image_splits/, images/).

    Training reads the chosen categories together (as SPRC does); validation scores each category
    against its own val gallery and averages over the categories.
    """

    data_type: Literal["images"] = setting("images", help="LAVIS data type (always images)")
    root: str = setting(help="FashionIQ root holding captions/, image_splits/ and images/", path="dir")
    categories: list[Literal["dress", "shirt", "toptee"]] = setting(
        default_factory=lambda: ["dress", "shirt", "toptee"], help="categories to train on and to validate (each its own gallery)"
    )
    image_extension: str = setting(".png", help="file extension of the images under images/ (SPRC reads .png)")
    image_size: int = setting(224, help="image resolution after the target-pad transform", ge=8)
    target_ratio: float = setting(1.25, help="target-pad aspect ratio (SPRC/CLIP4Cir: 1.25)", ge=1)
    max_train_samples: Optional[int] = setting(
        None, help="use only the first N training triplets of each category (smoke runs)", ge=1
    )
    max_eval_samples: Optional[int] = setting(
        None, help="use only the first N val triplets of each category (smoke runs; galleries stay whole)", ge=1
    )
    splits: list[Literal["train", "val"]] = setting(
        default_factory=lambda: ["train", "val"], help="splits to build (FashionIQ is scored on val, as in SPRC)"
    )
    caption_processor: Literal["blip_caption", "none"] = setting(
        "blip_caption", help="processing of the joined captions in training and evaluation: BLIP's eval caption "
        "processor (what SPRC applies) or none"
    )

    def extra_problems(self) -> Iterator[str]:
        if not self.categories:
            yield "categories: name at least one of dress, shirt, toptee"
        elif len(set(self.categories)) != len(self.categories):
            yield f"categories: a category is listed twice: {self.categories}"
        if not self.image_extension.startswith(".") or "/" in self.image_extension:
            yield f"image_extension: expected a file extension such as '.png', got {self.image_extension!r}"


def cross_block_problems(data: dict) -> list[str]:
    """Problems between the ``model:`` and ``run:`` blocks of a resolved ``lever_composed_retrieval`` recipe."""
    model = data.get("model", {})
    if not model.get("use_gated_fusion"):
        return []
    problem = lr_scale_problem("model.gated_fusion_lr_scale", float(model.get("gated_fusion_lr_scale", 1.0)),
                               data["run"].get("lr_sched", "linear_warmup_cosine_lr"))
    return [problem] if problem else []


def describe_plan(data: dict) -> list[str]:
    """``--dry-run`` lines of ``lever_blip2_cir``: the plugin, where it sits and its parameter count."""
    from lever_plugins.schemas.gated_fusion import gated_fusion_parameter_count

    model = data["model"]
    if not model["use_gated_fusion"]:
        return ["#   gated_fusion: off (use_gated_fusion: false) - the SPRC baseline"]
    vision_width, text_width = model["vision"]["width"], model["qformer"]["hidden_size"]
    count = gated_fusion_parameter_count(vision_width, text_width)
    return [
        f"#   gated_fusion: GatedFusionModule(hidden_size={vision_width}, text_width={text_width}, "
        f"num_heads={model['gated_fusion']['num_heads']}) on the reference-image tokens (after ln_vision, "
        f"before the Q-Former fusion pass), training and retrieval alike: {count:,} parameters, "
        f"lr x {model['gated_fusion_lr_scale']}"
    ]
