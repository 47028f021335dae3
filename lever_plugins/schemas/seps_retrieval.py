"""Recipe schemas of the SEPS image-text retrieval plugin: model, Flickr30K / COCO datasets, task.

* ``model:`` of ``arch: lever_blip2_seps`` (:class:`Blip2SepsSettings`): a BLIP-2 backbone (EVA ViT +
  Q-Former), the :class:`~lever_plugins.modules.seps.CrossSparseAggrNet` head (``seps_head:``) and
  its :class:`~lever_plugins.modules.seps.SEPSLoss` (``seps_loss:``), plus BLIP-2's ITC.
* ``datasets.lever_flickr30k`` / ``datasets.lever_coco`` (:class:`RetrievalDatasetSettings`): Karpathy
  splits in LAVIS's retrieval annotation format and a dense-caption file keyed by image.
* ``run:`` of ``task: lever_seps_retrieval`` (:class:`SepsRetrievalRunSettings`).

Pure Python (no torch), so ``lever-plugins validate`` stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Optional

from lever_plugins.schema import Settings, setting
from lever_plugins.schemas.blip2 import QformerSettings, VisionSettings
from lever_plugins.schemas.run import RunSettings, lr_scale_problem
from lever_plugins.schemas.seps import SepsHeadSettings, SepsLossSettings

RETRIEVAL_SPLITS = ("train", "val", "test")


@dataclass(kw_only=True)
class Blip2SepsSettings(Settings):
    """``model:`` block of ``arch: lever_blip2_seps`` (BLIP-2 retrieval with the SEPS head)."""

    arch: Literal["lever_blip2_seps"] = setting(help="registered model name")
    model_type: str = setting(help="size preset: tiny | pretrain (YAML under lever_plugins/configs/models)")
    vision: VisionSettings = setting(default_factory=VisionSettings, help="image encoder (EVA ViT + ln_vision)")
    qformer: QformerSettings = setting(default_factory=QformerSettings, help="Q-Former (also the text encoder)")
    embed_dim: int = setting(256, help="BLIP-2 ITC embedding size (vision_proj / text_proj)", ge=1)
    max_txt_len: int = setting(32, help="caption tokens, [CLS] and [SEP] included (longer captions are truncated)", ge=3)
    max_dense_txt_len: int = setting(
        128, help="dense-caption tokens, [CLS] and [SEP] included (longer dense captions are truncated)", ge=3
    )
    temperature_init: float = setting(0.07, help="initial learnable ITC temperature (clamped to [0.001, 0.5])", gt=0)
    loss_itc_weight: float = setting(
        1.0, help="weight of BLIP-2's ITC loss added to the SEPS loss (0: SEPS only; ITC is still used to re-rank)", ge=0
    )
    backbone_lr_scale: float = setting(
        0.1,
        help="lr multiplier of the BLIP-2 backbone (ViT if trained, Q-Former, ITC projections); the head and "
        "its projections train at run.init_lr (LAPS: 0.1). Needs a lever_* lr schedule",
        gt=0,
    )
    seps_head: SepsHeadSettings = setting(
        default_factory=SepsHeadSettings,
        help="CrossSparseAggrNet on ViT patch tokens and Q-Former word tokens, both projected to embed_size",
    )
    seps_loss: SepsLossSettings = setting(default_factory=SepsLossSettings, help="SEPSLoss settings")
    pretrained: Optional[str] = setting(
        None,
        help="local BLIP-2 checkpoint (e.g. blip2_pretrained.pth); only the head and its projections may be missing",
        path="checkpoint",  # or a transformers BLIP-2 folder, converted on load
    )
    finetuned: Optional[str] = setting(None, help="local checkpoint of this model to load after `pretrained`", path="file")

    @property
    def vit_patches(self) -> int:
        """Patch tokens of the ViT (CLS excluded): ``(image_size / patch_size) ** 2``."""
        return (self.vision.image_size // self.vision.patch_size) ** 2

    def extra_problems(self) -> Iterator[str]:
        qformer = self.qformer
        if isinstance(qformer, QformerSettings) and isinstance(qformer.max_position_embeddings, int):
            positions = qformer.max_position_embeddings
            for key in ("max_txt_len", "max_dense_txt_len"):
                value = getattr(self, key)
                # The text-only Q-Former pass has one position embedding per token: a longer text crashes in BERT.
                if isinstance(value, int) and not isinstance(value, bool) and value > positions:
                    yield (
                        f"{key}: {value} tokens exceed qformer.max_position_embeddings={positions} "
                        f"(the Q-Former's text positions); set {key} <= {positions}"
                    )
        vision, head = self.vision, self.seps_head
        if not isinstance(vision, VisionSettings) or not isinstance(head, SepsHeadSettings):
            return
        if vision.image_size % vision.patch_size == 0 and head.num_patches != self.vit_patches:
            yield (
                f"seps_head.num_patches: the ViT at vision.image_size={vision.image_size}, "
                f"vision.patch_size={vision.patch_size} gives {self.vit_patches} patch tokens; "
                f"set seps_head.num_patches: {self.vit_patches} (got {head.num_patches})"
            )


@dataclass(kw_only=True)
class RetrievalAnnotationFiles(Settings):
    """LAVIS retrieval annotation files per split (relative to the dataset ``root``, or absolute)."""

    train: str = setting(
        "annotations/train.json", help='train: list of {"image": rel path, "caption": str, "image_id": str|int}'
    )
    val: str = setting("annotations/val.json", help='val: list of {"image": rel path, "caption": [captions]}')
    test: str = setting("annotations/test.json", help='test: list of {"image": rel path, "caption": [captions]}')


@dataclass(kw_only=True)
class RetrievalDatasetSettings(Settings):
    """``datasets.lever_flickr30k`` block: Karpathy splits in LAVIS's format + one dense caption per image."""

    data_type: Literal["images"] = setting("images", help="LAVIS data type (always images)")
    root: str = setting(help="dataset folder; `images`, `annotations.*` and `dense_captions` are relative to it", path="dir")
    images: str = setting("images", help="image folder (relative to root, or absolute); annotation 'image' paths start here")
    annotations: RetrievalAnnotationFiles = setting(
        default_factory=RetrievalAnnotationFiles, help="annotation file of each split (LAVIS retrieval format)"
    )
    dense_captions: str = setting(
        "dense_captions.json",
        help='JSON object {"<annotation image path>": "dense caption"} covering the images of every split built',
    )
    missing_dense_caption: Literal["error", "empty"] = setting(
        "error", help="an image without a dense caption: error (one line naming it) or an empty dense caption"
    )
    image_size: int = setting(224, help="image resolution (must equal model.vision.image_size)", ge=8)
    train_augment: Literal["none", "crop", "crop_flip"] = setting(
        "crop_flip", help="training augmentation: none, random resized crop (scale 0.5-1), or crop + horizontal flip"
    )
    splits: list[Literal["train", "val", "test"]] = setting(
        default_factory=lambda: ["train", "val", "test"], help="splits to build"
    )
    max_train_samples: Optional[int] = setting(None, help="use only the first N training (image, caption) entries", ge=1)
    max_eval_images: Optional[int] = setting(None, help="use only the first N val/test images (and their captions)", ge=1)
    generate_demo: bool = setting(False, help="generate the embedded shapes demo into `root` if it is not there")

    def extra_problems(self) -> Iterator[str]:
        if isinstance(self.splits, list) and len(set(self.splits)) != len(self.splits):
            yield f"splits: each split at most once, got {self.splits}"


@dataclass(kw_only=True)
class CocoRetrievalDatasetSettings(RetrievalDatasetSettings):
    """``datasets.lever_coco`` block: as Flickr30K, evaluated with the COCO 1K (folds) and 5K protocols."""

    fold_images: int = setting(
        1000, help="COCO 1K protocol: images per fold (the 5K test split gives 5 folds of 1,000)", ge=1
    )


@dataclass(kw_only=True)
class SepsRetrievalRunSettings(RunSettings):
    """``run:`` block for ``task: lever_seps_retrieval``: the common keys plus these."""

    warmup_epochs: Optional[int] = setting(
        1,
        help="hardest-negative loss (max_violation) from this epoch on, easier sum before; "
        "null: keep model.seps_loss.max_violation throughout",
        ge=0,
    )
    eval_mode: Literal["all_pairs", "rerank"] = setting(
        "rerank",
        help="all_pairs: the head scores every (image, caption) pair; rerank: the head re-scores BLIP-2's "
        "top-k_test ITC candidates of each query (as LAVIS compute_sim_matrix does with ITM)",
    )
    k_test: int = setting(128, help="rerank: ITC candidates per query re-scored by the head", ge=1)
    eval_image_block: int = setting(
        16, help="all_pairs: images scored against every caption per head call (bounds memory with the head's pair_chunk_size)", ge=1
    )
    plot_loss_curves: bool = setting(True, help="after training, draw loss_curves.png from metrics.jsonl")


def cross_block_problems(data: dict) -> list[str]:
    """Problems between the ``model:`` and ``run:`` blocks of a resolved ``lever_seps_retrieval`` recipe."""
    problems = []
    warmup = data["run"].get("warmup_epochs")
    if data["model"]["seps_loss"]["max_violation"] and warmup is not None:
        problems.append(
            f"model.seps_loss.max_violation: true would be switched off for the first run.warmup_epochs={warmup} "
            "epoch(s); set it to false (hard negatives after the warm-up) or run.warmup_epochs: null (from the start)"
        )
    # LAVIS's own schedules would silently give the backbone the head's lr
    scale = lr_scale_problem("model.backbone_lr_scale", float(data["model"]["backbone_lr_scale"]), data["run"]["lr_sched"])
    return problems + ([scale] if scale else [])


def describe_plan(data: dict) -> list[str]:
    """``--dry-run`` lines of ``lever_blip2_seps``: where the head sits, its sizes and parameter count."""
    from lever_plugins.schemas.seps import SepsHeadSettings, seps_head_parameter_count

    model = data["model"]
    head = SepsHeadSettings(**model["seps_head"])
    loss = model["seps_loss"]
    vision_width, text_width, size = model["vision"]["width"], model["qformer"]["hidden_size"], head.embed_size
    projections = (vision_width * size + size) + (text_width * size + size)
    head_count = seps_head_parameter_count(head)
    return [
        f"#   seps_head: CrossSparseAggrNet(embed_size={size}, num_patches={head.num_patches}, has_cls={head.has_cls}, "
        f"sparse_ratio={head.sparse_ratio}, aggr_ratio={head.aggr_ratio}: keeps {head.num_keep} patches per pair, "
        f"{head.num_aggregated} aggregated tokens) on ln_vision(ViT) tokens -> Linear({vision_width}, {size}) and "
        f"Q-Former text-pass word tokens -> Linear({text_width}, {size}); dense captions (one per image) through the "
        f"same text pass: {head_count + projections:,} parameters (head {head_count:,} + projections {projections:,})",
        f"#   loss: SEPSLoss(margin={loss['margin']}, target_ratio={loss['target_ratio']}, ratio_weight={loss['ratio_weight']}) "
        f"+ {model['loss_itc_weight']} x BLIP-2 ITC; backbone lr x {model['backbone_lr_scale']}",
    ]
