"""``lever_blip2_seps``: BLIP-2 image-text retrieval with the SEPS head (CrossSparseAggrNet + SEPSLoss).

Which tokens the head sees (SPEC §6, "on BLIP-2 the head sits on the ViT patch tokens and Q-Former/BERT
word tokens projected to embed_size"):

* **image side**: the EVA ViT tokens after BLIP-2's ``ln_vision`` — ``[CLS] + (image_size /
  patch_size)^2`` patches, ``(B, 1 + N, vision.width)`` — through ``image_token_proj`` (Linear to
  ``seps_head.embed_size``). The CLS token is passed on with ``seps_head.has_cls: true`` (kept aside by
  the head), dropped before the head with ``false``. The Q-Former query outputs are *not* used here:
  they are 32 learned summaries, not patches, and selecting among them is not what the head is for.
* **text side**: the Q-Former's text-only BERT pass (the one BLIP-2 uses for its ITC text feature),
  every non-padding token (``[CLS]``, word pieces, ``[SEP]``) as LAPS does with BERT, through
  ``word_proj`` (Linear to ``embed_size``); lengths from the attention mask.
* **dense captions** (one per *image*) through the same text pass and ``word_proj``; in evaluation they
  are encoded once per image and cached.

Training loss: ``SEPSLoss(head sims, keep decisions, image ids) + loss_itc_weight * ITC`` where ITC is
BLIP-2's image-text contrastive loss (max over the query features of the image vs the text [CLS]
feature, learnable temperature), with every caption of the same image counted as a positive (soft
targets, as BLIP's retrieval fine-tuning does). Negatives are in-batch: every rank's batch under
torch.distributed (``run.gather_negatives``).

Evaluation (driven by ``lever_seps_retrieval``) uses :meth:`encode_images`, :meth:`encode_texts`,
:meth:`encode_dense_texts`, :meth:`head_similarity` and :meth:`itc_similarity`.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lever_plugins import catalog
from lever_plugins.models.blip2_components import Blip2PluginModel
from lever_plugins.modules.seps import CrossSparseAggrNet, SEPSLoss
from lever_plugins.runners import distributed as lever_dist
from lever_plugins.schemas.seps_retrieval import Blip2SepsSettings

logger = logging.getLogger(__name__)

# Weights this model has that a BLIP-2 checkpoint does not: the head and the two projections into it.
SEPS_NEW_KEYS = ("seps_head.", "image_token_proj.", "word_proj.")
# Parameter-name prefixes of the BLIP-2 backbone (trained at backbone_lr_scale x the base lr).
BACKBONE_PREFIXES = ("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens", "vision_proj.", "text_proj.", "temp")
TEMPERATURE_RANGE = (0.001, 0.5)


class TextTokens(NamedTuple):
    """Head-side word tokens of a batch of texts, plus BLIP-2's ITC text feature."""

    embeddings: torch.Tensor  # (B, L, C) projected to the head's embed_size; padded rows are zero
    lengths: torch.Tensor  # (B,) non-padding tokens ([CLS] + words + [SEP])
    itc: torch.Tensor  # (B, E) L2-normalised text_proj([CLS])


class ImageTokens(NamedTuple):
    """Head-side image tokens of a batch of images, plus BLIP-2's ITC query features."""

    embeddings: torch.Tensor  # (B, N(+1), C) projected ViT tokens (CLS first when seps_head.has_cls)
    itc: torch.Tensor  # (B, Q, E) L2-normalised vision_proj(query outputs)


class Blip2SepsModel(Blip2PluginModel):
    """BLIP-2 retrieval model with the SEPS head (registered as ``lever_blip2_seps``)."""

    ARCH = "lever_blip2_seps"
    PRETRAINED_MODEL_CONFIG_DICT = catalog.preset_config_paths(ARCH)
    NEW_KEYS = SEPS_NEW_KEYS

    def __init__(self, settings: Blip2SepsSettings):
        super().__init__()
        self.build_backbone(settings)
        embed_size = settings.seps_head.embed_size
        self.image_token_proj = nn.Linear(settings.vision.width, embed_size)
        self.word_proj = nn.Linear(settings.qformer.hidden_size, embed_size)
        self.seps_head = CrossSparseAggrNet(settings.seps_head)
        self.seps_loss = SEPSLoss(settings.seps_loss)
        self.max_dense_txt_len = settings.max_dense_txt_len
        self.load_checkpoints()

    # ----------------------------------------------------------------------------------- building
    def head_parameter_count(self) -> int:
        """Parameters of the plugin: the head and the two projections into it."""
        modules = (self.seps_head, self.image_token_proj, self.word_proj)
        return sum(p.numel() for module in modules for p in module.parameters())

    def param_groups_for_optimizer(self, weight_decay: float) -> list[dict]:
        """AdamW groups: backbone at ``lr_scale = backbone_lr_scale``, head and projections at 1.

        Biases, norms and 0/1-d parameters get no weight decay (as the runner's default grouping).
        """
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            backbone = name.startswith(BACKBONE_PREFIXES)
            no_decay = param.ndim < 2 or "bias" in name or "ln" in name or "norm" in name.lower()
            groups.setdefault((backbone, no_decay), []).append(param)
        out = []
        for (backbone, no_decay), params in sorted(groups.items()):
            out.append(
                {
                    "params": params,
                    "weight_decay": 0.0 if no_decay else float(weight_decay),
                    "lr_scale": self.settings.backbone_lr_scale if backbone else 1.0,
                    "name": f"{'backbone' if backbone else 'seps_head'}{'_no_decay' if no_decay else ''}",
                }
            )
        return out

    # ----------------------------------------------------------------------------------- encoders
    def _head_image_tokens(self, vit_tokens: torch.Tensor) -> torch.Tensor:
        """ViT tokens -> head tokens ``(B, N(+1), embed_size)`` (CLS kept only when ``has_cls``)."""
        if not self.settings.seps_head.has_cls:
            vit_tokens = vit_tokens[:, 1:]
        return self.image_token_proj(vit_tokens)

    def _encode_text(self, texts: Sequence[str], max_length: int) -> TextTokens:
        tokens = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.Qformer.bert(tokens.input_ids, attention_mask=tokens.attention_mask, return_dict=True).last_hidden_state
        mask = tokens.attention_mask
        embeddings = self.word_proj(hidden) * mask[..., None].to(hidden.dtype)
        itc = F.normalize(self.text_proj(hidden[:, 0, :]), dim=-1)
        return TextTokens(embeddings, mask.sum(dim=1), itc)

    def encode_images(self, images: torch.Tensor) -> ImageTokens:
        """Head tokens ``(B, N(+1), C)`` and ITC query features ``(B, Q, E)`` of a batch of images."""
        vit_tokens = self.image_tokens(images)
        return ImageTokens(self._head_image_tokens(vit_tokens), self.query_features(vit_tokens))

    def encode_texts(self, texts: Sequence[str]) -> TextTokens:
        """Caption word tokens ``(B, L_s, C)``, lengths ``(B,)`` and ITC features ``(B, E)``."""
        return self._encode_text(texts, self.max_txt_len)

    def encode_dense_texts(self, texts: Sequence[str]) -> TextTokens:
        """Dense-caption word tokens ``(B, L_d, C)`` and lengths ``(B,)`` (one row per image)."""
        return self._encode_text(texts, self.max_dense_txt_len)

    def head_similarity(
        self,
        image_tokens: torch.Tensor,
        dense_tokens: torch.Tensor,
        dense_lengths: torch.Tensor,
        caption_tokens: torch.Tensor,
        caption_lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Head scores ``(B_v, B_t)``: images (with their own dense captions) against captions.

        Args:
            image_tokens: ``(B_v, N(+1), C)`` from :meth:`encode_images`.
            dense_tokens, dense_lengths: ``(B_v, L_d, C)``, ``(B_v,)``: row v is image v's dense caption.
            caption_tokens, caption_lengths: ``(B_t, L_s, C)``, ``(B_t,)``.
        """
        was_training = self.seps_head.training
        self.seps_head.eval()
        try:
            return self.seps_head(image_tokens, caption_tokens, caption_lengths, dense_tokens, dense_lengths)
        finally:
            self.seps_head.train(was_training)

    @staticmethod
    def itc_similarity(image_itc: torch.Tensor, text_itc: torch.Tensor) -> torch.Tensor:
        """BLIP-2 ITC score ``(B_v, B_t)``: the best of the image's query features against the text feature.

        Args:
            image_itc: ``(B_v, Q, E)``; text_itc: ``(B_t, E)``.
        """
        return torch.einsum("vqe,te->vtq", image_itc, text_itc).amax(dim=-1)

    # ----------------------------------------------------------------------------------- training
    def itc_loss(self, image_itc: torch.Tensor, text_itc: torch.Tensor, image_ids: torch.Tensor,
                 gather: bool = False) -> torch.Tensor:
        """BLIP-2's ITC, both directions, every caption of the same image a positive (soft targets).

        With ``gather`` (under torch.distributed), this rank's images are scored against every rank's
        texts and its texts against every rank's images (all-gathered with gradient), positives by image
        id across ranks; the mean over ranks is then the single-process loss on the concatenated batch.
        """
        with torch.no_grad():
            self.temp.clamp_(*TEMPERATURE_RANGE)
        all_image_itc, all_text_itc, all_ids = image_itc, text_itc, image_ids
        if gather:
            all_image_itc = lever_dist.gather_with_grad(image_itc, "lever_blip2_seps ITC image features")
            all_text_itc = lever_dist.gather_with_grad(text_itc, "lever_blip2_seps ITC text features")
            all_ids = lever_dist.gather_no_grad(image_ids)
        positive = (image_ids[:, None] == all_ids[None, :]).float()  # (B, W*B): sample i vs every rank's sample j
        targets = positive / positive.sum(dim=1, keepdim=True)
        i2t_logits = self.itc_similarity(image_itc, all_text_itc) / self.temp  # this rank's images vs all texts
        t2i_logits = self.itc_similarity(all_image_itc, text_itc).t() / self.temp  # this rank's texts vs all images
        i2t = -(F.log_softmax(i2t_logits, dim=1) * targets).sum(dim=1).mean()
        t2i = -(F.log_softmax(t2i_logits, dim=1) * targets).sum(dim=1).mean()
        return (i2t + t2i) / 2

    def example_samples(self, batch_size: int = 2, seed: int = 0) -> dict:
        """A random batch in the layout :meth:`forward` reads (the plugin contract test's input)."""
        captions = ["a red square on the left", "a blue circle at the top", "a green shape in the middle"]
        dense = ["a large red square sits on the left side of a plain picture",
                 "a small blue circle is drawn near the top edge", "a green triangle stands in the middle"]
        return {"image": self.example_images(batch_size, seed),
                "text_input": [captions[i % len(captions)] for i in range(batch_size)],
                "dense_text": [dense[i % len(dense)] for i in range(batch_size)],
                "image_id": torch.arange(batch_size)}

    def forward(self, samples: Mapping[str, Any]) -> dict:
        """Training losses for a batch of (image, caption, dense caption of the image, image id) samples.

        Args:
            samples: ``image`` (B, 3, H, W), ``text_input`` list[str], ``dense_text`` list[str] (the dense
                caption of each sample's image), ``image_id`` (B,) int (equal for captions of one image).

        Returns:
            dict with ``loss`` (back-propagated) and, for logging, ``loss_seps``, ``loss_align``,
            ``loss_ratio``, ``loss_itc``, ``keep_ratio`` (fraction of patches the sparse branch actually
            kept: in training the head keeps the patches its decisions mark; without dual aggregation the
            mean of both branches), ``keep_ratio_dense`` (dense branch, when dual aggregation),
            ``keep_ratio_std`` / ``keep_ratio_dense_std`` (spread over the batch's (image, caption) pairs
            of the fraction each pair kept: population standard deviation) and ``max_violation`` (0/1).
        """
        for key in ("image", "text_input", "dense_text", "image_id"):
            if key not in samples:
                raise KeyError(f"lever_blip2_seps.forward: batch has no {key!r} (got {sorted(samples)})")
        image_ids = torch.as_tensor(samples["image_id"], device=self.device)
        gather = self.gather_negatives and lever_dist.world_size() > 1
        vit_tokens = self.image_tokens(samples["image"])
        image_tokens = self._head_image_tokens(vit_tokens)
        captions = self.encode_texts(samples["text_input"])
        # Dense captions only guide the selection; without score gradients (the default) they get none.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.seps_head.settings.selection_score_grad):
            dense = self.encode_dense_texts(samples["dense_text"])
        head_inputs = (image_tokens, captions.embeddings, captions.lengths, dense.embeddings, dense.lengths, image_ids)
        if gather:
            # As LAPS (multi_gpu): the head and its loss run on every rank's images and captions, gathered
            # with gradient (texts padded to the longest over ranks), so each rank computes the loss of the
            # whole batch and DDP's average of the gradients is that loss's gradient.
            head_inputs = (
                lever_dist.gather_with_grad(image_tokens, "lever_blip2_seps image tokens"),
                lever_dist.gather_padded_with_grad(captions.embeddings, 1, "lever_blip2_seps caption tokens"),
                lever_dist.gather_no_grad(captions.lengths),
                lever_dist.gather_padded_with_grad(dense.embeddings, 1, "lever_blip2_seps dense-caption tokens"),
                lever_dist.gather_no_grad(dense.lengths),
                lever_dist.gather_no_grad(image_ids),
            )
        output = self.seps_head(*head_inputs[:5])
        sims, score_mask = output if isinstance(output, tuple) else (output, None)
        loss_seps, loss_align, loss_ratio = self.seps_loss(sims, score_mask, img_ids=head_inputs[5])

        out = {
            "loss_seps": loss_seps.detach(),
            "loss_align": loss_align.detach(),
            "loss_ratio": loss_ratio.detach(),
            "max_violation": torch.tensor(float(self.seps_loss.max_violation)),
        }
        loss = loss_seps
        if self.settings.loss_itc_weight > 0:
            loss_itc = self.itc_loss(self.query_features(vit_tokens), captions.itc, image_ids, gather=gather)
            loss = loss + self.settings.loss_itc_weight * loss_itc
            out["loss_itc"] = loss_itc.detach()
        masks = score_mask if isinstance(score_mask, (tuple, list)) else () if score_mask is None else (score_mask,)
        for name, mask in zip(("keep_ratio", "keep_ratio_dense"), masks):
            per_pair = mask.detach().float().mean(dim=-1)  # (B_t, B_v): the fraction each pair kept
            out[name] = per_pair.mean()
            out[f"{name}_std"] = per_pair.std(correction=0)
        out["loss"] = loss
        return out
