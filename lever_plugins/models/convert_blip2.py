"""BLIP-2 weights between transformers' layout and LAVIS's (the layout ``model.pretrained`` reads).

Pure torch + json: imports neither LAVIS nor transformers, so ``lever-plugins convert-weights`` starts
fast and a transformers folder loads in the legacy environment too (transformers 4.26 predates
``Blip2ForImageTextRetrieval``, but reading its files needs no transformers at all).

What maps to what (``KEY_RULES``; every other key is listed as unused, never dropped silently):

* EVA ViT: ``vision_model.embeddings.{class_embedding, position_embedding, patch_embedding}`` ->
  ``visual_encoder.{cls_token, pos_embed, patch_embed.proj}``; ``encoder.layers.N.{layer_norm1,
  self_attn.qkv.weight, self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2}`` ->
  ``blocks.N.{norm1, attn.qkv.weight, attn.proj, norm2, mlp.fc1, mlp.fc2}``. transformers keeps one
  ``qkv.bias`` of ``3 * width``; EVA keeps ``q_bias`` and ``v_bias`` and no key bias. The key slice is
  dropped: it adds ``q . b_k`` to every key's logit of a query alike, which softmax cancels, so the
  attention output is unchanged (a nonzero slice is reported all the same). The layer count maps one to
  one: LAVIS builds EVA ViT-g with 39 of EVA's 40 blocks and transformers' BLIP-2 configs say
  ``num_hidden_layers: 39``; ``model.vision.depth`` is that number.
* ``vision_model.post_layernorm`` -> ``ln_vision`` (BLIP-2's LayerNorm on the ViT output; transformers
  folds it into the vision model).
* Q-Former: ``qformer.layernorm`` -> ``Qformer.bert.embeddings.LayerNorm`` (transformers applies it to
  ``[queries, word + position embeddings]`` as LAVIS's ``BertEmbeddings`` does);
  ``embeddings.{word,position}_embeddings`` (``Blip2ForImageTextRetrieval``'s own text embeddings) ->
  ``Qformer.bert.embeddings.*``; ``qformer.encoder.layer.N.{attention,crossattention}.attention.{query,
  key,value}`` -> ``...{attention,crossattention}.self.{query,key,value}``; ``output``,
  ``intermediate``, ``intermediate_query``, ``output_query`` keep their names.
* Heads: ``vision_projection`` -> ``vision_proj``, ``text_projection`` -> ``text_proj``,
  ``itm_head`` -> ``itm_head``, ``query_tokens`` -> ``query_tokens``.
* Filled in LAVIS's layout: ``Qformer.bert.embeddings.position_ids`` (a buffer, ``arange``) and
  ``temp`` (transformers' retrieval model has no learnable temperature; BLIP-2's initial 0.07 unless
  told otherwise). Both are listed in the report.

``Blip2Model`` / ``Blip2ForConditionalGeneration`` folders give the ViT, ``ln_vision``, the query
tokens and the Q-Former's query branch; they have no Q-Former text side and no ITC projections (the
report lists those as absent, and loading one into a retrieval model fails naming the missing
weights). Their ``language_projection`` and ``language_model`` keys are listed as unused.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from lever_plugins.checkpoints import CheckpointMismatch, read_torch_file
from lever_plugins.schema import expand_path

LAVIS_TEMP_INIT = 0.07  # Blip2Qformer's initial temperature
POSITION_IDS = "Qformer.bert.embeddings.position_ids"
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Attention heads are not in the weights' shapes: the sizes of the released BLIP-2 models.
KNOWN_VISION_HEADS = {1408: 16}  # EVA ViT-g (head dim 88)
KNOWN_QFORMER_HEADS = {768: 12}  # BERT-base


class ConversionError(ValueError):
    """A checkpoint or folder that cannot be read or converted (the message names the file)."""


# ------------------------------------------------------------------------------------------ key rules
_GROUPS = {
    "n": r"\d+",
    "p": r"weight|bias",
    "fc": r"fc1|fc2",
    "att": r"attention|crossattention",
    "qkv": r"query|key|value",
    "sub": r"dense|LayerNorm",
    "ffn": r"intermediate|intermediate_query",
    "out": r"output|output_query",
}

# (transformers key, LAVIS key); ``{name}`` matches _GROUPS[name] and is copied across.
KEY_RULES: tuple[tuple[str, str], ...] = (
    ("query_tokens", "query_tokens"),
    ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
    ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
    ("vision_model.embeddings.patch_embedding.{p}", "visual_encoder.patch_embed.proj.{p}"),
    ("vision_model.encoder.layers.{n}.layer_norm1.{p}", "visual_encoder.blocks.{n}.norm1.{p}"),
    ("vision_model.encoder.layers.{n}.self_attn.qkv.weight", "visual_encoder.blocks.{n}.attn.qkv.weight"),
    ("vision_model.encoder.layers.{n}.self_attn.projection.{p}", "visual_encoder.blocks.{n}.attn.proj.{p}"),
    ("vision_model.encoder.layers.{n}.layer_norm2.{p}", "visual_encoder.blocks.{n}.norm2.{p}"),
    ("vision_model.encoder.layers.{n}.mlp.{fc}.{p}", "visual_encoder.blocks.{n}.mlp.{fc}.{p}"),
    ("vision_model.post_layernorm.{p}", "ln_vision.{p}"),
    ("embeddings.word_embeddings.weight", "Qformer.bert.embeddings.word_embeddings.weight"),
    ("embeddings.position_embeddings.weight", "Qformer.bert.embeddings.position_embeddings.weight"),
    ("qformer.layernorm.{p}", "Qformer.bert.embeddings.LayerNorm.{p}"),
    ("qformer.encoder.layer.{n}.{att}.attention.{qkv}.{p}", "Qformer.bert.encoder.layer.{n}.{att}.self.{qkv}.{p}"),
    ("qformer.encoder.layer.{n}.{att}.output.{sub}.{p}", "Qformer.bert.encoder.layer.{n}.{att}.output.{sub}.{p}"),
    ("qformer.encoder.layer.{n}.{ffn}.dense.{p}", "Qformer.bert.encoder.layer.{n}.{ffn}.dense.{p}"),
    ("qformer.encoder.layer.{n}.{out}.{sub}.{p}", "Qformer.bert.encoder.layer.{n}.{out}.{sub}.{p}"),
    ("vision_projection.{p}", "vision_proj.{p}"),
    ("text_projection.{p}", "text_proj.{p}"),
    ("itm_head.{p}", "itm_head.{p}"),
)
# One transformers tensor <-> two LAVIS tensors (EVA has no key bias).
QKV_BIAS_RULE = ("vision_model.encoder.layers.{n}.self_attn.qkv.bias",
                 ("visual_encoder.blocks.{n}.attn.q_bias", "visual_encoder.blocks.{n}.attn.v_bias"))

# What a BLIP-2 ITC/ITM checkpoint holds, by part (for the report of what a folder lacks).
LAVIS_PARTS = (
    ("ViT (visual_encoder.*)", r"visual_encoder\."),
    ("ln_vision", r"ln_vision\."),
    ("query_tokens", r"query_tokens$"),
    ("Q-Former text embeddings (Qformer.bert.embeddings.word_embeddings / position_embeddings)",
     r"Qformer\.bert\.embeddings\.(word|position)_embeddings\."),
    ("Q-Former query branch (Qformer.bert.encoder.layer.*)", r"Qformer\.bert\.encoder\.layer\.\d+\.attention\."),
    ("Q-Former text FFN (Qformer.bert.encoder.layer.*.intermediate / output)", r"Qformer\.bert\.encoder\.layer\.\d+\.intermediate\."),
    ("vision_proj", r"vision_proj\."),
    ("text_proj", r"text_proj\."),
    ("itm_head", r"itm_head\."),
)


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_GROUPS[part]})" for i, part in enumerate(parts))
    return re.compile(pattern)


_FORWARD = [(_compile(src), dst) for src, dst in KEY_RULES]
_BACKWARD = [(_compile(dst), src) for src, dst in KEY_RULES]
_QKV_FORWARD = _compile(QKV_BIAS_RULE[0])
_Q_BACKWARD, _V_BACKWARD = (_compile(t) for t in QKV_BIAS_RULE[1])


def _map(key: str, rules) -> Optional[str]:
    for pattern, target in rules:
        match = pattern.fullmatch(key)
        if match:
            return target.format(**match.groupdict())
    return None


def transformers_key_to_lavis(key: str) -> Optional[str]:
    """The LAVIS name of a transformers BLIP-2 key (None: not a weight LAVIS's BLIP-2 has)."""
    return _map(key, _FORWARD)


def lavis_key_to_transformers(key: str) -> Optional[str]:
    """The transformers name of a LAVIS BLIP-2 key (None: transformers' BLIP-2 has no such weight)."""
    return _map(key, _BACKWARD)


# ------------------------------------------------------------------------------------------ report
def summarise_keys(keys: list[str], limit: int = 6) -> str:
    """Keys grouped by their first two name parts: ``language_model.model.* (196 keys), itm_head.weight``."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        groups.setdefault(".".join(parts[:2]) + ".*" if len(parts) > 2 else key, []).append(key)
    shown = [members[0] if len(members) == 1 else f"{name} ({len(members)} keys)" for name, members in groups.items()]
    return ", ".join(shown[:limit]) + (f", ... (+{len(shown) - limit} more groups)" if len(shown) > limit else "")


@dataclass
class ConversionReport:
    """What a conversion did with every key: mapped, filled in, dropped exactly, unused, absent."""

    source: str
    direction: str  # "transformers -> LAVIS" or "LAVIS -> transformers"
    architecture: str = ""
    mapped: int = 0
    filled: dict[str, str] = field(default_factory=dict)  # target key -> why / value
    exact_drops: list[str] = field(default_factory=list)  # weights with no effect on the output
    unused: dict[str, str] = field(default_factory=dict)  # source key -> why it is not used
    absent_parts: list[str] = field(default_factory=list)  # parts of a full BLIP-2 the result lacks
    notes: list[str] = field(default_factory=list)  # differences in computation worth knowing

    def unused_by_reason(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key, reason in self.unused.items():
            out.setdefault(reason, []).append(key)
        return out

    def lines(self) -> list[str]:
        head = f"{self.source}: {self.direction}"
        if self.architecture:
            head += f" ({self.architecture})"
        out = [f"{head}: {self.mapped} tensors mapped"]
        out += [f"  filled: {key} = {why}" for key, why in self.filled.items()]
        out += [f"  dropped, no effect on outputs: {drop}" for drop in self.exact_drops]
        for reason, keys in self.unused_by_reason().items():
            out.append(f"  unused ({reason}): {len(keys)} tensors: {summarise_keys(keys)}")
        out += [f"  absent (not in the source): {part}" for part in self.absent_parts]
        out += [f"  note: {note}" for note in self.notes]
        return out

    def text(self) -> str:
        return "\n".join(self.lines())


# ------------------------------------------------------------------------------------------ conversion
def transformers_to_lavis(
    tensors: Mapping[str, torch.Tensor],
    config: Optional[Mapping[str, Any]] = None,
    *,
    source: str = "<state dict>",
    temp: Optional[float] = LAVIS_TEMP_INIT,
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """A transformers BLIP-2 state dict (any ``Blip2*`` class) in LAVIS's ``Blip2Qformer`` layout.

    Args:
        tensors: name -> tensor (may be lazy: only mapped tensors are read).
        config: the folder's ``config.json`` (for the report's notes; optional).
        temp: value of LAVIS's ``temp`` (transformers has none); None leaves it out.
    """
    config = dict(config or {})
    report = ConversionReport(source, "transformers -> LAVIS", architecture=", ".join(config.get("architectures") or []))
    out: dict[str, torch.Tensor] = {}
    for key in tensors:
        match = _QKV_FORWARD.fullmatch(key)
        if match:
            bias = tensors[key]
            q_bias, k_bias, v_bias = bias.chunk(3)
            q_key, v_key = (t.format(**match.groupdict()) for t in QKV_BIAS_RULE[1])
            out[q_key], out[v_key] = q_bias.clone(), v_bias.clone()
            if torch.count_nonzero(k_bias):
                report.exact_drops.append(f"{key}[{k_bias.numel()}:{2 * k_bias.numel()}] (key bias, max |b| "
                                          f"{k_bias.abs().max().item():.3g}; softmax cancels it)")
            report.mapped += 1
            continue
        target = transformers_key_to_lavis(key)
        if target is None:
            report.unused[key] = _unused_reason_transformers(key)
            continue
        out[target] = tensors[key]
        report.mapped += 1
    for key in list(out):  # a ViT saved without qkv biases (qkv_bias: false) computes what zero biases compute
        match = re.fullmatch(r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight", key)
        if match and f"visual_encoder.blocks.{match.group(1)}.attn.q_bias" not in out:
            for name in QKV_BIAS_RULE[1]:
                bias_key = name.format(n=match.group(1))
                out[bias_key] = torch.zeros(out[key].shape[0] // 3, dtype=out[key].dtype)
                report.filled[bias_key] = "zeros (the folder's ViT has no qkv bias)"
    position_rows = out.get("Qformer.bert.embeddings.position_embeddings.weight")
    if position_rows is not None:
        out[POSITION_IDS] = torch.arange(position_rows.shape[0]).unsqueeze(0)
        report.filled[POSITION_IDS] = f"arange({position_rows.shape[0]}) (a buffer LAVIS saves)"
    if temp is not None and ("vision_proj.weight" in out or "text_proj.weight" in out):
        out["temp"] = torch.tensor(float(temp))
        report.filled["temp"] = (f"{temp} (transformers' BLIP-2 has no learnable temperature"
                                 f"{'; BLIP-2 initial value' if temp == LAVIS_TEMP_INIT else ''})")
    report.absent_parts = [name for name, pattern in LAVIS_PARTS if not any(re.match(pattern, k) for k in out)]
    report.notes += _config_notes(config)
    return out, report


def _unused_reason_transformers(key: str) -> str:
    if key.startswith("language_model.") or key.startswith("language_projection."):
        return "the language model and its projection; LAVIS's Blip2Qformer has none"
    return "no LAVIS BLIP-2 counterpart"


def _config_notes(config: Mapping[str, Any]) -> list[str]:
    notes = []
    vision = config.get("vision_config") or {}
    qformer = config.get("qformer_config") or {}
    if vision.get("hidden_act", "gelu") != "gelu" or qformer.get("hidden_act", "gelu") != "gelu":
        notes.append(f"hidden_act vision {vision.get('hidden_act')!r} / qformer {qformer.get('hidden_act')!r}: "
                     "LAVIS's EVA ViT and Q-Former use exact gelu")
    eps = vision.get("layer_norm_eps")
    if eps is not None and eps != 1e-6:
        notes.append(f"vision layer_norm_eps {eps}: EVA's block norms use 1e-6")
    if qformer.get("position_embedding_type", "absolute") != "absolute":
        notes.append(f"qformer position_embedding_type {qformer.get('position_embedding_type')!r}: our Q-Former uses absolute")
    if config.get("image_token_index") is not None:
        notes.append("image_token_index is set: transformers' retrieval inputs start with query placeholders; "
                     "LAVIS's do not (weights are the same)")
    return notes


def lavis_to_transformers(
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "<state dict>",
    vision_heads: Optional[int] = None,
    qformer_heads: Optional[int] = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], ConversionReport]:
    """A LAVIS BLIP-2 state dict as a ``Blip2ForImageTextRetrieval`` state dict + its ``config.json``.

    The sizes come from the weights' shapes; attention heads do not, so they default to the released
    BLIP-2 sizes (EVA ViT-g 1408 -> 16 heads, Q-Former 768 -> 12) and must be given for other widths.
    """
    report = ConversionReport(source, "LAVIS -> transformers", architecture="Blip2ForImageTextRetrieval")
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        for which, pattern in (("q", _Q_BACKWARD), ("v", _V_BACKWARD)):
            match = pattern.fullmatch(key)
            if match:
                biases.setdefault(QKV_BIAS_RULE[0].format(**match.groupdict()), {})[which] = tensor
                break
        else:
            target = lavis_key_to_transformers(key)
            if target is None:
                report.unused[key] = _unused_reason_lavis(key)
                continue
            out[target] = tensor
            report.mapped += 1
    for key, parts in biases.items():
        if set(parts) != {"q", "v"}:
            raise ConversionError(f"{source}: {key}: EVA has q_bias and v_bias, found only {sorted(parts)}")
        out[key] = torch.cat([parts["q"], torch.zeros_like(parts["q"]), parts["v"]])
        report.mapped += 2
    if "itm_head.weight" not in out:
        report.absent_parts.append("itm_head (transformers initialises it randomly: do not use "
                                   "use_image_text_matching_head=True)")
    for name in ("vision_projection", "text_projection"):
        if f"{name}.weight" not in out:
            report.absent_parts.append(f"{name} (transformers initialises it randomly)")
    config = transformers_config_for(out, source=source, vision_heads=vision_heads, qformer_heads=qformer_heads)
    return out, config, report


def _unused_reason_lavis(key: str) -> str:
    if key == "temp":
        return "transformers' Blip2ForImageTextRetrieval has no learnable temperature"
    if key == POSITION_IDS:
        return "a buffer transformers rebuilds"
    if key.startswith("Qformer.cls."):
        return "the Q-Former's language-model head; Blip2ForImageTextRetrieval has none"
    return "no transformers BLIP-2 counterpart"


def _layer_indices(keys, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for m in map(regex.match, keys) if m})


def transformers_config_for(
    tensors: Mapping[str, torch.Tensor],
    *,
    source: str = "<state dict>",
    vision_heads: Optional[int] = None,
    qformer_heads: Optional[int] = None,
) -> dict[str, Any]:
    """``config.json`` of a ``Blip2ForImageTextRetrieval`` holding ``tensors`` (transformers names)."""
    def need(key: str) -> torch.Tensor:
        if key not in tensors:
            raise ConversionError(f"{source}: not a BLIP-2 checkpoint with a ViT and a Q-Former (no {_both_names(key)})")
        return tensors[key]

    patch = need("vision_model.embeddings.patch_embedding.weight")
    width, patch_size = patch.shape[0], patch.shape[-1]
    positions = need("vision_model.embeddings.position_embedding").shape[1] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise ConversionError(f"{source}: {positions} ViT patch positions do not form a square grid")
    blocks = _layer_indices(tensors, r"vision_model\.encoder\.layers\.(\d+)\.")
    layers = _layer_indices(tensors, r"qformer\.encoder\.layer\.(\d+)\.")
    cross = _layer_indices(tensors, r"qformer\.encoder\.layer\.(\d+)\.crossattention\.")
    if not layers or not cross:
        raise ConversionError(f"{source}: no Q-Former layers with cross-attention")
    frequency = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if cross != [i for i in range(len(layers)) if i % frequency == 0]:
        raise ConversionError(f"{source}: cross-attention in Q-Former layers {cross} is not every N-th layer from 0")
    hidden = need("qformer.layernorm.weight").shape[0]
    word = tensors.get("embeddings.word_embeddings.weight")
    position = tensors.get("embeddings.position_embeddings.weight")
    vision_heads = vision_heads or KNOWN_VISION_HEADS.get(width)
    qformer_heads = qformer_heads or KNOWN_QFORMER_HEADS.get(hidden)
    if not vision_heads or not qformer_heads:
        missing = [f"--vision-heads (ViT width {width})"] * (not vision_heads) + [f"--qformer-heads (Q-Former width {hidden})"] * (not qformer_heads)
        raise ConversionError(f"{source}: attention heads are not in the weights; give {' and '.join(missing)}")
    for name, size, heads in (("vision", width, vision_heads), ("Q-Former", hidden, qformer_heads)):
        if size % heads:
            raise ConversionError(f"{source}: {name} width {size} is not divisible by {heads} heads")
    projection = tensors.get("vision_projection.weight", tensors.get("text_projection.weight"))
    return {
        "architectures": ["Blip2ForImageTextRetrieval"],
        "model_type": "blip-2",
        "num_query_tokens": int(need("query_tokens").shape[1]),
        "image_text_hidden_size": int(projection.shape[0]) if projection is not None else 256,
        "image_token_index": None,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "torch_dtype": str(patch.dtype).replace("torch.", ""),
        "vision_config": {
            "model_type": "blip_2_vision_model",
            "hidden_size": int(width),
            "intermediate_size": int(need("vision_model.encoder.layers.0.mlp.fc1.weight").shape[0]),
            "num_hidden_layers": len(blocks),
            "num_attention_heads": int(vision_heads),
            "image_size": int(grid * patch_size),
            "patch_size": int(patch_size),
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-6,
            "attention_dropout": 0.0,
            "qkv_bias": "vision_model.encoder.layers.0.self_attn.qkv.bias" in tensors,
        },
        "qformer_config": {
            "model_type": "blip_2_qformer",
            "vocab_size": int(word.shape[0]) if word is not None else 30523,
            "hidden_size": int(hidden),
            "num_hidden_layers": len(layers),
            "num_attention_heads": int(qformer_heads),
            "intermediate_size": int(need("qformer.encoder.layer.0.intermediate_query.dense.weight").shape[0]),
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": int(position.shape[0]) if position is not None else 512,
            "layer_norm_eps": 1e-12,
            "pad_token_id": 0,
            "position_embedding_type": "absolute",
            "cross_attention_frequency": int(frequency),
            "encoder_hidden_size": int(need(f"qformer.encoder.layer.{cross[0]}.crossattention.attention.key.weight").shape[1]),
            "use_qformer_text_input": "qformer.encoder.layer.0.intermediate.dense.weight" in tensors,
        },
    }


def _both_names(key: str) -> str:
    """A transformers key with its LAVIS name beside it, for messages."""
    lavis = transformers_key_to_lavis(key)
    return f"{key} / {lavis}" if lavis else key


def recipe_settings_for(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model:`` keys of our BLIP-2 models that match a transformers BLIP-2 ``config.json``."""
    vision = config.get("vision_config") or {}
    qformer = config.get("qformer_config") or {}
    out: dict[str, Any] = {}
    if vision:
        width, inner = int(vision["hidden_size"]), int(vision["intermediate_size"])
        ratio = round(inner / width, 4)
        while int(width * ratio) < inner:  # EVA builds int(width * mlp_ratio) hidden units
            ratio = round(ratio + 1e-4, 4)
        out["vision"] = {"image_size": vision.get("image_size", 224), "patch_size": vision.get("patch_size", 14),
                         "width": width, "depth": vision["num_hidden_layers"],
                         "num_heads": vision["num_attention_heads"], "mlp_ratio": ratio}
    if qformer:
        out["qformer"] = {key: qformer[source] for key, source in (
            ("hidden_size", "hidden_size"), ("num_hidden_layers", "num_hidden_layers"),
            ("num_attention_heads", "num_attention_heads"), ("intermediate_size", "intermediate_size"),
            ("max_position_embeddings", "max_position_embeddings"), ("cross_attention_freq", "cross_attention_frequency"),
        ) if source in qformer}
        if "num_query_tokens" in config:
            out["qformer"]["num_query_token"] = config["num_query_tokens"]
    if config.get("image_text_hidden_size"):
        out["embed_dim"] = config["image_text_hidden_size"]
    return out


# ------------------------------------------------------------------------------------------ files
class _LazyTensors(Mapping):
    """name -> tensor over safetensors files, read on access (unused language-model weights never are)."""

    def __init__(self, locations: Mapping[str, str], opener: Callable[[str], Any]):
        self._locations = dict(locations)
        self._opener = opener
        self._handles: dict[str, Any] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        file = self._locations[key]
        if file not in self._handles:
            self._handles[file] = self._opener(file)
        return self._handles[file].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._locations)

    def __len__(self) -> int:
        return len(self._locations)


def read_transformers_folder(path: str) -> tuple[dict[str, Any], Mapping[str, torch.Tensor]]:
    """``(config, tensors)`` of a transformers BLIP-2 folder; errors are one line naming what is wrong."""
    folder = expand_path(path)
    if not os.path.isdir(folder):
        raise ConversionError(f"{path}: not a folder")
    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ConversionError(f"{path}: not a transformers model folder (no {CONFIG_FILE})")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{config_path}: cannot read ({exc})") from None
    if not isinstance(config, dict) or config.get("model_type") != "blip-2":
        kind = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ConversionError(f"{path}: not a transformers BLIP-2 folder ({CONFIG_FILE} has model_type {kind!r}, "
                              "expected 'blip-2': Blip2ForImageTextRetrieval, Blip2Model, Blip2ForConditionalGeneration)")
    present = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))]
    if not present:
        raise ConversionError(f"{path}: no weights next to {CONFIG_FILE} (expected one of {', '.join(WEIGHT_FILES)})")
    name = present[0]
    if name.endswith(".index.json"):
        index_path = os.path.join(folder, name)
        try:
            with open(index_path, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConversionError(f"{index_path}: not a sharded-weights index ({type(exc).__name__}: {exc})") from None
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(folder, shard)):
                raise ConversionError(f"{index_path}: shard {shard} is missing")
        locations = {key: os.path.join(folder, shard) for key, shard in weight_map.items()}
    else:
        locations = None
        single = os.path.join(folder, name)
    if name.startswith("model.safetensors"):
        try:
            from safetensors import safe_open
        except ImportError:
            raise ConversionError(f"{path}: reading {name} needs the safetensors package (pip install safetensors)") from None

        def opener(file: str):
            try:
                return safe_open(file, framework="pt")
            except Exception as exc:  # corrupt or truncated file
                raise ConversionError(f"{file}: cannot read as safetensors ({type(exc).__name__}: {exc})") from None

        if locations is None:
            locations = {key: single for key in opener(single).keys()}
        return config, _LazyTensors(locations, opener)
    files = sorted(set(locations.values())) if locations is not None else [single]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(_torch_load(file))
    return config, tensors


def _torch_load(path: str, label: Optional[str] = None) -> dict:
    """:func:`~lever_plugins.checkpoints.read_torch_file`, its error as this module's :class:`ConversionError`."""
    try:
        return read_torch_file(path, label)
    except CheckpointMismatch as exc:
        raise ConversionError(str(exc)) from None


def load_transformers_folder(path: str, *, temp: Optional[float] = LAVIS_TEMP_INIT) -> tuple[dict, ConversionReport]:
    """A transformers BLIP-2 folder as a LAVIS-layout state dict (in memory) + the conversion report."""
    config, tensors = read_transformers_folder(path)
    return transformers_to_lavis(tensors, config, source=path, temp=temp)


def read_checkpoint(path: str) -> dict:
    """A LAVIS-layout state dict from a torch checkpoint file (weights-only) or a transformers BLIP-2 folder.

    Files: a bare state dict, ``{"model": ...}`` (LAVIS / our runner), ``{"state_dict": ...}``, or SPRC's
    ``{"epoch": e, "<model class name>": state_dict}``. A folder is converted in memory
    (:func:`load_transformers_folder`); its report is logged.
    """
    resolved = expand_path(path)
    if os.path.isdir(resolved):
        state_dict, report = load_transformers_folder(path)
        worth_a_warning = report.unused or report.absent_parts or report.notes
        logging.getLogger(__name__).log(logging.WARNING if worth_a_warning else logging.INFO, "%s", report.text())
        return state_dict
    checkpoint = _torch_load(resolved, path)
    if isinstance(checkpoint.get("model"), dict):
        return checkpoint["model"]
    if isinstance(checkpoint.get("state_dict"), dict):
        return checkpoint["state_dict"]
    # SPRC's training script saves {"epoch": e, "<model class name>": state_dict}.
    nested = [key for key, value in checkpoint.items() if isinstance(value, dict)]
    if len(nested) == 1 and set(checkpoint) <= {"epoch", nested[0]}:
        return checkpoint[nested[0]]
    return checkpoint


def save_transformers_folder(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], folder: str) -> str:
    """Write ``config.json`` + ``model.safetensors`` (``pytorch_model.bin`` without safetensors); return the weights file."""
    from lever_plugins.io import atomic_output, write_json_atomic

    os.makedirs(folder, exist_ok=True)
    tensors = {key: value.detach().contiguous().clone() for key, value in state_dict.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    name = "model.safetensors" if save_file is not None else "pytorch_model.bin"
    target = os.path.join(folder, name)
    with atomic_output(target) as tmp:
        if save_file is not None:
            save_file(tensors, tmp, metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)
    write_json_atomic(os.path.join(folder, CONFIG_FILE), dict(config), indent=2)
    return target
