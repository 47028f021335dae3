"""Query / candidate features for the selectors, pools and RICES, cached to disk.

Encoders (``run.embed.encoder``):

* ``blip2``: a BLIP-2 Q-Former feature extractor built from explicit sizes with
  :mod:`lever_plugins.models.blip2_components` (LAVIS modules, local weights only). ``modality``:
  ``text`` pools the Q-Former text outputs; ``image`` pools the 32 query outputs over the image;
  ``multimodal`` pools the query outputs when queries attend the image and self-attend with the text
  (BLIP-2's multimodal features). Width: the Q-Former hidden size (768 for real BLIP-2).
* ``transformers``: any local ``AutoModel`` text encoder (e.g. BERT / MiniLM), mean or [CLS] pooling.

Three tables are cached under ``datasets.lever_vqa_icl.features_dir``, each
``{"question_ids": (N,), "embeddings": (N, d)}`` (loaded with ``weights_only=True``): ``train_query``
(supporting-set questions), ``train_candidate`` (supporting-set demonstrations: question + answer,
or the same as ``train_query`` with ``candidate_text: question``) and ``eval_query``; optionally
centred (``center``) and L2-normalised. ``manifest.json`` records what made them; a cache made with
other settings is refused rather than silently mixed. Raw features are saved in parts of
``PART_EXAMPLES`` examples, so an interrupted run resumes.

Under torch.distributed every rank calls :func:`embed_stage`: the batches of each part (examples in
question_id order, ``batch_size`` per batch, exactly the single-process batches) are dealt to the
ranks (:func:`~lever_plugins.runners.distributed.shard_indices`), encoded there and gathered
(:func:`~lever_plugins.runners.distributed.gather_sharded`); rank 0 writes the part files, tables
and manifest. The features equal the single-process ones bit for bit, and the part files do not
depend on the number of ranks, so a run resumes under any ``--nproc``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lever_plugins.checkpoints import read_torch_file
from lever_plugins.icl.data import IclDataError, VqaExample, VqaSplit, load_example_image, read_json
from lever_plugins.runners import distributed as lever_dist
from lever_plugins.io import atomic_output, write_json_atomic
from lever_plugins.schema import expand_path
from lever_plugins.schemas.icl import EmbedSettings

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TABLES = ("train_query", "train_candidate", "eval_query")
PART_EXAMPLES = 4096
RANDOM_INIT_SEED = 0

# BLIP-2's eval image transform (LAVIS blip_image_eval): bicubic resize, CLIP mean / std.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(B, L, H)`` with ``mask (B, L)`` -> ``(B, H)``: first position or masked mean."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


class FeatureEncoder(nn.Module):
    """Maps texts (and optionally images) to ``(N, dim)`` features."""

    dim: int
    needs_images: bool = False

    def encode(self, texts: Sequence[str], images: Optional[Sequence[Any]] = None) -> torch.Tensor:
        raise NotImplementedError


class TransformersTextEncoder(FeatureEncoder):
    """A local ``transformers`` encoder (``AutoModel`` + ``AutoTokenizer``)."""

    def __init__(self, path: str, pooling: str, device: torch.device, max_length: int = 64):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"run.embed.path: encoder folder not found: {path}")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.pooling = pooling
        self.max_length = max_length
        self.device = device
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], images: Optional[Sequence[Any]] = None) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
        hidden = self.model(**tokens).last_hidden_state
        return _pool(hidden, tokens["attention_mask"], self.pooling).float()


class Blip2FeatureEncoder(FeatureEncoder):
    """BLIP-2 Q-Former features; module names match LAVIS's ``Blip2Qformer`` so its checkpoints load."""

    def __init__(self, settings: EmbedSettings, device: torch.device):
        super().__init__()
        from lever_plugins.models.blip2_components import (
            build_qformer, build_tokenizer, build_vision_encoder, load_checked, load_torch_file,
        )

        blip2 = settings.blip2
        self.modality = settings.modality
        self.pooling = settings.pooling
        self.max_txt_len = blip2.max_txt_len
        self.needs_images = settings.modality != "text"
        self.tokenizer = build_tokenizer(blip2.qformer)
        vision_width = blip2.vision.width
        if self.needs_images:
            self.visual_encoder, self.ln_vision = build_vision_encoder(blip2.vision)
            self.image_size = blip2.vision.image_size
        self.Qformer, self.query_tokens = build_qformer(blip2.qformer, vision_width, len(self.tokenizer))
        self.dim = blip2.qformer.hidden_size
        if blip2.pretrained:
            # Only the parts this modality uses must be present; heads and projections are not used.
            unused = ("vision_proj.", "text_proj.", "itm_head.", "temp", "Qformer.cls.")
            if not self.needs_images:
                unused += ("visual_encoder.", "ln_vision.")
            allowed_missing = ("Qformer.cls.",)
            if blip2.vision.checkpoint:
                allowed_missing += ("visual_encoder.",)
            load_checked(self, load_torch_file(blip2.pretrained), blip2.pretrained,
                         allowed_missing=allowed_missing, ignored_unexpected=unused)
        self.device = device
        self.to(device).eval()

    def _image_tensor(self, images: Sequence[Any]) -> torch.Tensor:
        from torchvision import transforms

        transform = transforms.Compose([
            transforms.Resize((self.image_size, self.image_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(_CLIP_MEAN, _CLIP_STD),
        ])
        return torch.stack([transform(image) for image in images]).to(self.device)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], images: Optional[Sequence[Any]] = None) -> torch.Tensor:
        text = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt").to(self.device)
        if self.modality == "text":
            hidden = self.Qformer.bert(text.input_ids, attention_mask=text.attention_mask, return_dict=True).last_hidden_state
            return _pool(hidden, text.attention_mask, self.pooling).float()
        if images is None:
            raise ValueError("BLIP-2 image / multimodal features need images")
        vit_dtype = next(self.visual_encoder.parameters()).dtype  # fp16 ViT-g on cuda
        image_embeds = self.ln_vision(self.visual_encoder(self._image_tensor(images).to(vit_dtype)).float())
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        num_query = queries.shape[1]
        query_mask = torch.ones(queries.shape[:-1], dtype=torch.long, device=self.device)
        if self.modality == "image":
            output = self.Qformer.bert(query_embeds=queries, encoder_hidden_states=image_embeds,
                                       encoder_attention_mask=image_atts, return_dict=True)
        else:
            output = self.Qformer.bert(text.input_ids, query_embeds=queries,
                                       attention_mask=torch.cat([query_mask, text.attention_mask], dim=1),
                                       encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, return_dict=True)
        return _pool(output.last_hidden_state[:, :num_query], query_mask, self.pooling).float()


def build_encoder(settings: EmbedSettings) -> FeatureEncoder:
    from lever_plugins.icl.vlm import resolve_device

    device = resolve_device(settings.device)
    if settings.encoder == "transformers":
        return TransformersTextEncoder(expand_path(str(settings.path)), settings.pooling, device)
    # Weights that no checkpoint covers (all of them without blip2.pretrained, the demo) are drawn from
    # a fixed seed, not from the process's RNG: every rank (seeded run.seed + rank) builds the same encoder.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return Blip2FeatureEncoder(settings, device)


# ------------------------------------------------------------------------------------------ cache


def query_text(example: VqaExample) -> str:
    return example.question


def candidate_text(example: VqaExample, kind: str) -> str:
    return example.question if kind == "question" else f"{example.question} {example.answer}"


def _load_images(examples: Sequence[VqaExample]) -> list:
    hint = "image features need the split's image folder (datasets.lever_vqa_icl.train_images / eval_images)"
    return [load_example_image(example, hint) for example in examples]


def table_path(cache_dir: str, table: str) -> str:
    return os.path.join(cache_dir, f"{table}.pt")


def encode_table(
    encoder: FeatureEncoder, examples: Sequence[VqaExample], texts: Sequence[str], cache_dir: str, table: str,
    batch_size: int, progress: bool = True,
) -> Optional[torch.Tensor]:
    """Raw ``(N, dim)`` features of ``examples``, computed part by part (finished parts are reused).

    Under torch.distributed every rank must call it: each encodes its share of every part's batches;
    rank 0 gathers them, writes the part and returns the table (the other ranks return None).
    """
    main = lever_dist.is_main_process()
    parts = []
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), desc=f"embed {table}", leave=False, dynamic_ncols=True)
    for part, lo in enumerate(range(0, len(examples), PART_EXAMPLES)):
        hi = min(len(examples), lo + PART_EXAMPLES)
        path = _part_path(cache_dir, table, part)
        if lever_dist.broadcast_object(os.path.isfile(path)):  # rank 0's view: every rank takes the same branch
            if main:
                parts.append(read_torch_file(path, expected=torch.Tensor))
            if bar is not None:
                bar.update(hi - lo)
            continue
        starts = list(range(lo, hi, batch_size))
        chunks = []
        for index in lever_dist.shard_indices(len(starts)):  # this rank's batches of the part
            start = starts[index]
            batch = examples[start:min(hi, start + batch_size)]
            images = _load_images(batch) if encoder.needs_images else None
            chunks.append(encoder.encode(texts[start:start + len(batch)], images).float().cpu())
            if bar is not None:
                bar.update(len(batch))
        done_here = sum(len(c) for c in chunks)
        chunks = lever_dist.gather_sharded(chunks)  # every batch of the part, in order
        if not main:
            continue
        if bar is not None:
            bar.update(hi - lo - done_here)  # the other ranks' batches
        features = torch.cat(chunks)
        with atomic_output(path) as tmp:
            torch.save(features, tmp)
        parts.append(features)
    if bar is not None:
        bar.close()
    return torch.cat(parts) if main else None


def _part_path(cache_dir: str, table: str, part: int) -> str:
    return os.path.join(cache_dir, f"{table}.part{part:05d}.pt")


def finish_tables(raw: dict[str, torch.Tensor], center: bool, normalize: bool) -> dict[str, torch.Tensor]:
    """Optional centring, then optional L2 normalisation.

    Centring subtracts the supporting set's mean: ``train_query``'s mean from the query tables
    (``train_query`` and ``eval_query``, so that evaluation queries are treated like training ones)
    and ``train_candidate``'s from the candidates.
    """
    out = {}
    for name, values in raw.items():
        if center:
            values = values - raw["train_candidate" if name == "train_candidate" else "train_query"].mean(0)
        out[name] = F.normalize(values, dim=-1) if normalize else values
    return out


def embed_fingerprint(settings: EmbedSettings, train: VqaSplit, eval_split: VqaSplit) -> dict:
    """What the cached features depend on (not where or how fast they were computed)."""
    encoder = settings.to_dict()
    for key in ("batch_size", "device"):
        encoder.pop(key)
    return {
        "encoder": encoder,
        "train_questions": len(train),
        "train_first_last": [train.examples[0].question_id, train.examples[-1].question_id],
        "eval_questions": len(eval_split),
        "eval_first_last": [eval_split.examples[0].question_id, eval_split.examples[-1].question_id],
    }


def check_manifest(cache_dir: str, fingerprint: dict, what: str, hint: str) -> Optional[dict]:
    """The manifest of ``cache_dir`` if it matches ``fingerprint``; None if absent; an error if it differs."""
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    manifest = read_json(path, f"{what} manifest")
    recorded = manifest.get("fingerprint")
    if recorded != fingerprint:
        differing = _differences(recorded or {}, fingerprint)
        raise IclDataError(
            f"{path}: the {what} in {cache_dir} were made with other settings ({'; '.join(differing[:6])}); "
            f"{hint}"
        )
    return manifest


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out.extend(_differences(old.get(key), new.get(key), f"{prefix}{key}."))
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def embed_stage(
    settings: EmbedSettings, train: VqaSplit, eval_split: VqaSplit, cache_dir: str, progress: bool = True
) -> dict[str, dict]:
    """Compute (or reuse) the three feature tables; returns them by name.

    Under torch.distributed every rank calls it (see the module docstring); every rank returns the tables.
    """
    main = lever_dist.is_main_process()
    os.makedirs(cache_dir, exist_ok=True)
    fingerprint = embed_fingerprint(settings, train, eval_split)
    problem, reuse = None, False
    if main:  # rank 0 decides; the others follow (a mismatch stops every rank, none waits forever)
        try:
            manifest = check_manifest(
                cache_dir, fingerprint, "features",
                "delete that folder or point datasets.lever_vqa_icl.features_dir at a new one",
            )
            reuse = bool(manifest is not None and manifest.get("complete")
                         and all(os.path.isfile(table_path(cache_dir, t)) for t in TABLES))
            if not reuse:
                write_json_atomic(os.path.join(cache_dir, MANIFEST), {"fingerprint": fingerprint, "complete": False}, indent=2)
        except IclDataError as exc:
            problem = str(exc)
    problem, reuse = lever_dist.broadcast_object((problem, reuse))
    if problem:
        raise IclDataError(problem)
    if reuse:
        logger.info("embed: reusing the features in %s", cache_dir)
        return load_tables(cache_dir)
    encoder = build_encoder(settings)
    logger.info("embed: %s features (%s, d=%d) into %s", settings.encoder, settings.modality, encoder.dim, cache_dir)
    raw: dict[str, torch.Tensor] = {}
    jobs = [
        ("train_query", train.examples, [query_text(e) for e in train.examples]),
        ("eval_query", eval_split.examples, [query_text(e) for e in eval_split.examples]),
    ]
    if settings.candidate_text != "question":
        jobs.insert(1, ("train_candidate", train.examples, [candidate_text(e, settings.candidate_text) for e in train.examples]))
    for table, examples, texts in jobs:
        raw[table] = encode_table(encoder, examples, texts, cache_dir, table, settings.batch_size, progress)
    if not main:
        lever_dist.barrier()  # rank 0 writes the tables
        return load_tables(cache_dir)
    raw.setdefault("train_candidate", raw["train_query"])
    finished = finish_tables(raw, settings.center, settings.normalize)
    ids = {"train_query": train.question_ids, "train_candidate": train.question_ids, "eval_query": eval_split.question_ids}
    tables = {}
    for name, values in finished.items():
        tables[name] = {"question_ids": torch.tensor(ids[name], dtype=torch.long), "embeddings": values.contiguous()}
        with atomic_output(table_path(cache_dir, name)) as tmp:
            torch.save(tables[name], tmp)
    dims = {name: int(t["embeddings"].shape[1]) for name, t in tables.items()}
    write_json_atomic(
        os.path.join(cache_dir, MANIFEST),
        {"fingerprint": fingerprint, "complete": True, "dim": dims["train_query"],
         "tables": {name: {"file": os.path.basename(table_path(cache_dir, name)), "count": int(t["embeddings"].shape[0])}
                    for name, t in tables.items()}},
        indent=2,
    )
    for name in os.listdir(cache_dir):
        if ".part" in name and name.endswith(".pt"):
            os.remove(os.path.join(cache_dir, name))
    lever_dist.barrier()
    return tables


def load_tables(cache_dir: str) -> dict[str, dict]:
    """The cached tables (an error naming the folder if the embed stage has not finished there)."""
    manifest_path = os.path.join(cache_dir, MANIFEST)
    manifest = read_json(manifest_path, "features manifest") if os.path.isfile(manifest_path) else None
    if not manifest or not manifest.get("complete"):
        raise IclDataError(f"{cache_dir}: no finished feature cache; run the embed stage first (run.stages)")
    return {t: read_torch_file(table_path(cache_dir, t)) for t in TABLES}


def rows_for(table: dict, question_ids: Sequence[int], where: str) -> torch.Tensor:
    """``(len(question_ids), d)`` feature rows of ``table`` in the order of ``question_ids``."""
    index = {int(q): i for i, q in enumerate(table["question_ids"].tolist())}
    missing = [q for q in question_ids if q not in index]
    if missing:
        raise IclDataError(f"{where}: no features for question_ids {missing[:5]} (re-run the embed stage)")
    return table["embeddings"][torch.tensor([index[q] for q in question_ids], dtype=torch.long)]
