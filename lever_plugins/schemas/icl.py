"""Settings of the ICD-selection plugin: pointer-selector model, VQA and caption datasets, and the staged run.

A recipe with ``run.task: lever_icl_selection`` runs the stages listed in ``run.stages`` in order:
``embed`` -> ``beam_search`` -> ``train`` -> ``select`` -> ``evaluate``. Each stage writes under its
own folder and skips work already done (see :mod:`lever_plugins.tasks.icl_selection`).

Pure Python (no torch): ``lever-plugins validate`` stays fast.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, fields
from typing import ClassVar, Iterator, Literal, Optional

from lever_plugins.schema import Settings, setting, settings_from
from lever_plugins.schemas.blip2 import QformerSettings, VisionSettings
from lever_plugins.schemas.pointer import (
    SELECTOR_SETTINGS, CrossAttentionKeys, PointerSelectorKeys, PointerSelectorV1Settings, RankingLossKeys,
)
from lever_plugins.schemas.run import RunSettings

STAGES = ("embed", "beam_search", "train", "select", "evaluate")
Stage = Literal["embed", "beam_search", "train", "select", "evaluate"]
SELECTION_METHODS = ("random", "similarity", "pointer")


@dataclass(kw_only=True)
class _PointerModelKeys(Settings):
    arch: Literal["lever_pointer_selector"] = setting(help="registered model name")
    model_type: Literal["v1", "v2", "v3"] = setting(
        help="selector version: v1 bi-encoder | v2 + cross-attention | v3 + ranking loss (presets under configs/models)"
    )


# Bases in reverse key order (dataclasses list the last base's keys first): arch, model_type, the keys of
# every version, V2's, V3's, then this class's own.
@dataclass(kw_only=True)
class PointerSelectorSettings(RankingLossKeys, CrossAttentionKeys, PointerSelectorKeys, _PointerModelKeys):
    """``model:`` block of ``arch: lever_pointer_selector``; ``model_type`` (v1 | v2 | v3) is the version.

    Every key of the three versions (:mod:`lever_plugins.schemas.pointer`), flat. A key only another
    version reads (V2: ``num_heads``, ``attn_dropout``; V3: ``ranking_*``, ``radi_*``,
    ``teacher_checkpoint``) must keep its default: it would be ignored.
    """

    teacher_checkpoint: Optional[str] = setting(
        None, help="v3 RADI: checkpoint of a trained lever_pointer_selector run (its recipe is read from it)", path="file"
    )
    finetuned: Optional[str] = setting(None, help="checkpoint of this model to start from (weights only)", path="file")

    def selector_settings(self) -> PointerSelectorV1Settings:
        """The settings of the selector module this block builds (``PointerSelectorV{1,2,3}Settings``)."""
        cls = SELECTOR_SETTINGS[self.model_type]
        return settings_from(cls, {f.name: getattr(self, f.name) for f in fields(cls)}, "model")

    def extra_problems(self) -> Iterator[str]:
        selected = SELECTOR_SETTINGS.get(self.model_type)
        if selected is None:  # built in Python with a wrong value (recipes are type-checked before this runs)
            yield f"model_type: expected one of {', '.join(map(repr, SELECTOR_SETTINGS))}, got {self.model_type!r}"
            return
        common = {f.name for f in fields(PointerSelectorKeys)}
        only_in = {f.name: version for version, cls in SELECTOR_SETTINGS.items() for f in fields(cls) if f.name not in common}
        only_in["teacher_checkpoint"] = "v3"  # read by the LAVIS model (it loads the RADI teacher), not by the module
        defaults = {f.name: f.default for f in fields(self)}
        for key, version in only_in.items():
            if version != self.model_type and self.differs_from_default(key):
                yield (f"{key}: read only by model_type {version} (this is {self.model_type}); leave it out "
                       f"(or at its default, {defaults[key]!r}), or set model_type: {version}")
        yield from selected.extra_problems(self)  # the version's own checks, on this block's values
        if self.model_type == "v3" and self.ranking_loss_type.startswith("radi_") and not self.teacher_checkpoint:
            yield f"teacher_checkpoint: ranking_loss_type {self.ranking_loss_type} distils from a trained selector; give its checkpoint"


@dataclass(kw_only=True)
class _IclDemoKeys(Settings):
    data_type: Literal["images"] = setting("images", help="LAVIS data type (always images)")
    generate_demo: bool = setting(False, help="generate the embedded demo (data + tiny language model) into `root`")
    root: Optional[str] = setting(None, help="demo: folder the generated data and model go to", path="dir")


@dataclass(kw_only=True)
class _VqaFileKeys(Settings):
    train_questions: Optional[str] = setting(None, help="supporting set questions JSON (e.g. v2_OpenEnded_mscoco_train2014_questions.json)", path="file")
    train_annotations: Optional[str] = setting(None, help="supporting set annotations JSON (e.g. v2_mscoco_train2014_annotations.json)", path="file")
    eval_questions: Optional[str] = setting(None, help="evaluation questions JSON (e.g. v2_OpenEnded_mscoco_val2014_questions.json)", path="file")
    eval_annotations: Optional[str] = setting(None, help="evaluation annotations JSON (e.g. v2_mscoco_val2014_annotations.json)", path="file")
    train_images: Optional[str] = setting(None, help="folder of the supporting-set images (needed by image VLMs / image features)", path="dir")
    eval_images: Optional[str] = setting(None, help="folder of the evaluation images", path="dir")
    train_image_template: str = setting("COCO_train2014_{image_id:012d}.jpg", help="image file name in train_images, from image_id")
    eval_image_template: str = setting("COCO_val2014_{image_id:012d}.jpg", help="image file name in eval_images, from image_id")


@dataclass(kw_only=True)
class _CaptionFileKeys(Settings):
    karpathy_json: Optional[str] = setting(
        None, help="Karpathy split file (dataset_coco.json: images[] with filepath, filename, cocoid, split, sentences)", path="file"
    )
    images: Optional[str] = setting(None, help="folder holding each image's <filepath>/<filename> (e.g. the COCO root with train2014/, val2014/)", path="dir")
    train_splits: list[Literal["train", "restval", "val", "test"]] = setting(
        default_factory=lambda: ["train", "restval"], help="Karpathy splits of the supporting set (beam-search queries and candidates)"
    )
    eval_splits: list[Literal["train", "restval", "val", "test"]] = setting(
        default_factory=lambda: ["test"], help="Karpathy splits of the evaluation queries"
    )


@dataclass(kw_only=True)
class _BeamDataKeys(Settings):
    features_dir: Optional[str] = setting(
        None, help="feature cache written by the embed stage (null: <run.output_dir>/embed); share it between recipes"
    )
    beam_dir: Optional[str] = setting(
        None, help="beams.json + pools.json written by the beam_search stage (null: <run.output_dir>/beam_search)"
    )
    train_on: Literal["all", "best"] = setting(
        "all", help="training sequences per query: every beam kept by the beam search (Lever-LM) or the best only (val: always the best)"
    )
    beam_score_transform: Literal["none", "zscore", "rank"] = setting(
        "zscore",
        help="beam scores before training (V3 listwise target = sigmoid(score)): raw | z-score | rank -> normal quantile, "
        "fitted on the training scores",
    )
    val_fraction: float = setting(0.1, help="fraction of beam-search queries held out (by question_id) to validate the selector", gt=0, lt=1)
    split_seed: int = setting(0, help="seed of the train/val split by question_id")


# Bases in reverse key order (dataclasses list the last base's keys first).
@dataclass(kw_only=True)
class VqaIclDatasetSettings(_BeamDataKeys, _VqaFileKeys, _IclDemoKeys):
    """``datasets.lever_vqa_icl``: VQAv2 / OK-VQA questions + annotations, features and beam-search files.

    ``train_*`` is the supporting set: beam-search queries and every candidate demonstration come
    from it. ``eval_*`` holds the evaluation queries (e.g. VQAv2 val2014). The builder trains on
    ``beam_dir``'s beams with ``features_dir``'s features, split into train / val by question_id
    (every kept beam of a training query with ``train_on: all``; the best beam of each val query).
    """

    dataset_name: ClassVar[str] = "lever_vqa_icl"
    task_kind: ClassVar[str] = "vqa"

    demo_lm_steps: int = setting(300, help="demo: training steps of the tiny language model the generator trains", ge=1)

    def extra_problems(self) -> Iterator[str]:
        files = ("train_questions", "train_annotations", "eval_questions", "eval_annotations")
        yield from _source_problems(self, {key: "a local VQAv2-format JSON file" for key in files})
        for key in ("train_image_template", "eval_image_template"):
            problem = _template_problem(getattr(self, key), {"image_id"}, {"image_id"})
            if problem:
                yield f"{key}: {problem}"


@dataclass(kw_only=True)
class CocoCaptionIclDatasetSettings(_BeamDataKeys, _CaptionFileKeys, _IclDemoKeys):
    """``datasets.lever_coco_caption_icl``: COCO captions (Karpathy split JSON + images), features and beam files.

    Each image is one example keyed by its ``cocoid`` (:mod:`lever_plugins.icl.caption_data`); the
    images of ``train_splits`` are the supporting set (beam-search queries and candidates), those of
    ``eval_splits`` the evaluation queries. Training data as in ``lever_vqa_icl``.
    """

    dataset_name: ClassVar[str] = "lever_coco_caption_icl"
    task_kind: ClassVar[str] = "caption"

    demo_lm_steps: int = setting(400, help="demo: training steps of the tiny language model the generator trains", ge=1)

    def extra_problems(self) -> Iterator[str]:
        yield from _source_problems(self, {"karpathy_json": "a local Karpathy-format dataset_coco.json", "images": "a local image folder"})
        for key in ("train_splits", "eval_splits"):
            if not getattr(self, key):
                yield f"{key}: at least one Karpathy split"
        shared = sorted(set(self.train_splits) & set(self.eval_splits))
        if shared:
            yield f"eval_splits: {shared} also in train_splits; evaluation queries must not be supporting examples"


def _source_problems(data: Settings, keys: dict[str, str]) -> Iterator[str]:
    """The data files (``keys``: key -> what it must be) are generated (``generate_demo``, under ``root``) or given, not both."""
    if data.generate_demo:
        if not data.root:
            yield "root: required with generate_demo: true (where the demo is generated)"
        for key in keys:
            if getattr(data, key):
                yield f"{key}: the demo generates its own files under root; remove it or set generate_demo: false"
    else:
        for key, what in keys.items():
            if not getattr(data, key):
                yield f"{key}: required ({what}), or set generate_demo: true"


# The dataset blocks the lever_icl_selection task reads (exactly one per recipe), by recipe name.
ICL_DATASETS: dict[str, type] = {cls.dataset_name: cls for cls in (VqaIclDatasetSettings, CocoCaptionIclDatasetSettings)}


def _template_problem(template: str, allowed: set[str], required: set[str]) -> Optional[str]:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        return f"not a valid format string ({exc})"
    unknown = names - allowed
    if unknown:
        return f"unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
    missing = required - names
    if missing:
        return f"must contain {', '.join('{' + m + '}' for m in sorted(missing))}"
    return None


# What a demonstration (icd_template) and a query (query_template) show, per task kind
# (lever_plugins.icl.kinds): template placeholder -> the example attribute it is filled with.
TEMPLATE_FIELDS: dict[str, dict[str, dict[str, str]]] = {
    "vqa": {"demo": {"question": "question", "answer": "answer"}, "query": {"question": "question"}},
    "caption": {"demo": {"caption": "answer"}, "query": {}},
}


def template_problems(vlm_kind: str, icd_template: str, query_template: str, task_kind: str) -> list[str]:
    """Problems of ``run.vlm``'s templates for ``task_kind`` (a key of :data:`TEMPLATE_FIELDS`): each
    holds exactly its placeholders. ``icd_template`` is read by ``causal_lm`` only."""
    fields_of = TEMPLATE_FIELDS[task_kind]
    checks = [("query_template", query_template, set(fields_of["query"]))]
    if vlm_kind == "causal_lm":
        checks.insert(0, ("icd_template", icd_template, set(fields_of["demo"])))
    problems = []
    for key, template, names in checks:
        problem = _template_problem(template, names, names)
        if problem:
            problems.append(f"{key}: {problem}")
    return problems


@dataclass(kw_only=True)
class VlmSettings(Settings):
    """``run.vlm``: the VLM that scores demonstrations (beam search) and answers (evaluation)."""

    kind: Literal["causal_lm", "qwen2_5_vl"] = setting(
        "qwen2_5_vl", help="causal_lm: any AutoModelForCausalLM, text only | qwen2_5_vl: Qwen2.5-VL chat VLM with images"
    )
    path: Optional[str] = setting(
        None, help="local model folder (config, weights, tokenizer/processor); null only with the generated demo", path="dir"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting("auto", help="weights dtype (auto: bfloat16 on cuda, float32 on cpu)")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", help="where the VLM runs")
    batch_size: int = setting(16, help="sequences per forward pass when scoring or generating", ge=1)
    max_new_tokens: int = setting(10, help="generation length cap for answers", ge=1)
    instruction: str = setting("", help="text put before the demonstrations (qwen2_5_vl: the system prompt)")
    icd_template: str = setting(
        "Question: {question} Short answer: {answer}", help="one demonstration (VQA: {question}, {answer}; captioning: {caption})"
    )
    query_template: str = setting(
        "Question: {question} Short answer:", help="the query (VQA: {question}; captioning: no placeholder); the answer / caption follows it"
    )
    separator: str = setting("\n", help="between demonstrations and before the query (causal_lm)")
    score_eos: bool = setting(True, help="beam search also scores the end-of-answer token (EOS / <|im_end|>), as Lever-LM does")
    use_images: bool = setting(True, help="qwen2_5_vl: show each example's image (needs datasets.*_images)")
    max_pixels: Optional[int] = setting(None, help="qwen2_5_vl: image processor max_pixels (null: the processor's default)", ge=784)

    def extra_problems(self) -> Iterator[str]:
        # Placeholders of any task kind here; the dataset decides which kind's, exactly (icl.plan.dataset_problems).
        for key, part in (("icd_template", "demo"), ("query_template", "query")):
            allowed = {name for kind_fields in TEMPLATE_FIELDS.values() for name in kind_fields[part]}
            problem = _template_problem(getattr(self, key), allowed, set())
            if problem:
                yield f"{key}: {problem}"
        defaults = {f.name: f.default for f in fields(VlmSettings)}
        if self.kind == "qwen2_5_vl":
            # Chat demonstrations are user/assistant turns built from query_template and the answer.
            for key in ("icd_template", "separator"):
                if getattr(self, key) != defaults[key]:
                    yield f"{key}: read only by kind causal_lm (qwen2_5_vl puts each demonstration in its own chat turns)"
        elif self.max_pixels is not None:
            yield "max_pixels: read only by kind qwen2_5_vl"


@dataclass(kw_only=True)
class EncoderQformerSettings(QformerSettings):
    """:class:`QformerSettings` whose ``vocab_file`` is required by ``run.embed`` only with ``encoder: blip2``."""

    def extra_problems(self) -> Iterator[str]:
        yield from (p for p in super().extra_problems() if not p.startswith("vocab_file:"))


@dataclass(kw_only=True)
class Blip2EncoderSettings(Settings):
    """``run.embed.blip2``: a BLIP-2 Q-Former feature extractor built from explicit sizes (local weights)."""

    vision: VisionSettings = setting(default_factory=VisionSettings, help="EVA ViT (image / multimodal features)")
    qformer: EncoderQformerSettings = setting(default_factory=EncoderQformerSettings, help="Q-Former (vocab_file required)")
    pretrained: Optional[str] = setting(None, help="local blip2_pretrained.pth (null: random init, demo only)", path="file")
    max_txt_len: int = setting(32, help="text tokens (truncated)", ge=1)


@dataclass(kw_only=True)
class EmbedSettings(Settings):
    """``run.embed``: query / candidate features, cached to disk and reused by every later stage."""

    encoder: Literal["blip2", "transformers"] = setting(
        "blip2", help="blip2: LAVIS Q-Former features | transformers: AutoModel text encoder from `path`"
    )
    path: Optional[str] = setting(None, help="transformers: local encoder folder (model + tokenizer)", path="dir")
    modality: Literal["text", "image", "multimodal"] = setting(
        "multimodal", help="blip2: text [CLS]-side features, image query features, or image+text (the Q-Former with both)"
    )
    pooling: Literal["mean", "cls"] = setting("mean", help="how token / query outputs become one vector")
    candidate_text: Literal["question", "question_answer"] = setting(
        "question_answer", help="text of a candidate demonstration: its question, or question + answer"
    )
    center: bool = setting(
        False, help="subtract the supporting set's mean feature first (random or anisotropic encoders put all features in a narrow cone)"
    )
    normalize: bool = setting(True, help="L2-normalise the features")
    batch_size: int = setting(64, help="examples per encoder forward pass", ge=1)
    device: Literal["auto", "cpu", "cuda"] = setting("auto", help="where the encoder runs")
    blip2: Blip2EncoderSettings = setting(default_factory=Blip2EncoderSettings, help="encoder: blip2 settings")

    def extra_problems(self) -> Iterator[str]:
        if self.encoder == "transformers":
            if not self.path:
                yield "path: required with encoder: transformers (a local model folder)"
            if self.modality != "text":
                yield f"modality: encoder transformers encodes text only, got {self.modality!r}"
            if self.blip2 != Blip2EncoderSettings():
                yield "blip2: read only by encoder: blip2; remove it"
        else:
            if self.blip2.qformer.vocab_file is None:
                yield "blip2.qformer.vocab_file: required with encoder: blip2 (a local WordPiece vocab.txt; nothing is downloaded)"
            if self.path:
                yield "path: read only by encoder: transformers; the blip2 encoder takes blip2.pretrained"
            if self.modality == "text" and self.blip2.vision != VisionSettings():
                yield "blip2.vision: text features build no image encoder; remove it or use modality image / multimodal"


@dataclass(kw_only=True)
class BeamSearchSettings(Settings):
    """``run.beam_search``: candidate pools and VLM-scored beam search (Lever-LM defaults)."""

    num_queries: int = setting(5000, help="beam-search queries drawn from the supporting set (Lever-LM: 5,000)", ge=1)
    pool: Literal["random", "similarity"] = setting("random", help="candidate pool per query: random, or top-K by feature similarity")
    pool_size: int = setting(32, help="K candidates per query (Lever-LM: 64; the pointer-selector design: 32)", ge=2)
    beam_size: int = setting(5, help="beams kept per step (Lever-LM: 5)", ge=1)
    shots: int = setting(2, help="demonstrations per sequence (Lever-LM: 2; the original beam files: 6)", ge=1)
    score: Literal["prob_gain", "logprob_gain"] = setting(
        "prob_gain",
        help="prob_gain: InfoScore exp(-NLL) difference (Lever-LM) | logprob_gain: difference of mean answer log-probabilities",
    )
    rank_by: Literal["last_gain", "cumulative_gain"] = setting(
        "last_gain",
        help="which extensions a step keeps: highest last-step gain s(S+c)-s(S) (Lever-LM) | highest gain over zero-shot s(S+c)-s([])",
    )
    seed: int = setting(0, help="seed of the query sample and the random pools")

    def extra_problems(self) -> Iterator[str]:
        if self.shots > self.pool_size:
            yield f"shots: cannot choose {self.shots} distinct demonstrations from pool_size {self.pool_size}"


@dataclass(kw_only=True)
class IclEvaluateSettings(Settings):
    """``run.evaluation``: ICD selection for evaluation queries and VQA accuracy of the prompted VLM."""

    num_queries: Optional[int] = setting(1000, help="evaluation queries (a seeded sample of the eval split; null: all)", ge=1)
    shots: list[int] = setting(default_factory=lambda: [1, 2], help="shot counts compared (zero-shot is always reported)")
    methods: list[Literal["random", "similarity", "pointer"]] = setting(
        default_factory=lambda: ["random", "similarity", "pointer"],
        help="selection methods: random, similarity (RICES: nearest supporting examples), pointer (the trained selector)",
    )
    checkpoint: str = setting("best", help="selector weights for `select`: best | last | a checkpoint path")
    seed: int = setting(0, help="seed of the query sample and of random selection")

    def extra_problems(self) -> Iterator[str]:
        if not self.shots:
            yield "shots: at least one shot count (zero-shot is added automatically)"
        for shots in self.shots:
            if isinstance(shots, int) and shots < 1:
                yield f"shots: shot counts must be >= 1 (zero-shot is always reported), got {shots}"
        if len(set(self.methods)) != len(self.methods):
            yield f"methods: repeated method in {self.methods}"


@dataclass(kw_only=True)
class IclSelectionRunSettings(RunSettings):
    """``run:`` block for ``task: lever_icl_selection``: the common keys plus the stages."""

    stages: list[Stage] = setting(
        default_factory=lambda: list(STAGES), help="stages to run, in pipeline order: embed, beam_search, train, select, evaluate"
    )
    agg_metric: Literal["top1", "top3", "top5", "mrr", "ndcg@6"] = setting(
        "mrr", help="validation metric that picks checkpoint_best (MRR of the beam's demonstration at each step)"
    )
    vlm: VlmSettings = setting(default_factory=VlmSettings, help="the VLM (beam-search scorer and evaluated model)")
    embed: EmbedSettings = setting(help="feature extractor (required: features feed pools, RICES and the selector)")
    beam_search: BeamSearchSettings = setting(default_factory=BeamSearchSettings, help="pools and beam search")
    # Not ``evaluate``: LAVIS's runner reads run.evaluate as "evaluate only".
    evaluation: IclEvaluateSettings = setting(default_factory=IclEvaluateSettings, help="select + evaluate stages")

    def extra_problems(self) -> Iterator[str]:
        yield from super().extra_problems()
        if not self.stages:
            yield "stages: at least one stage"
        elif len(set(self.stages)) != len(self.stages):
            yield f"stages: repeated stage in {self.stages}"
        elif [s for s in STAGES if s in self.stages] != list(self.stages):
            yield f"stages: must follow the pipeline order {list(STAGES)}, got {self.stages}"
