"""``lever_blip2_cir``: BLIP-2 Q-Former composed image retrieval with an optional gated-fusion plugin.

Computes what SPRC's ``Blip2QformerCirAlignPrompt`` computes (proved on shared weights against SPRC's
own code in ``tests/test_sprc_parity.py``), written anew on stock LAVIS:

* fusion pass: the query tokens cross-attend the reference-image tokens while self-attending with the
  modification-text tokens; a second, image-free pass reads ``[fused query outputs, text]`` and the
  text [CLS] (first position after the prompt) -> ``text_proj`` is the fusion feature ``f`` (B, E);
* target side: queries over the target-image tokens -> ``vision_proj`` -> ``t`` (B, Q, E);
  similarity ``s(f, t) = max_q <f, t_q>``;
* losses: ``itc`` (in-batch cross-entropy over s / temperature), ``rtc`` (image-free pass over
  ``[CLS, learnable prompts, text[1:]]``, read at index 0, against the same targets), ``align`` (MSE
  between the mean fused query output and the detached mean prompt);
  ``loss = itc + w_rtc * rtc + w_align * align``.

SPRC's Q-Former is a modified LAVIS copy: a pass without image features sends every position through
the text FFN, prompts included (stock LAVIS would use the query FFN). Our image-free passes do the same
through :func:`~lever_plugins.models.blip2_components.image_free_pass`, without editing LAVIS.

With ``use_gated_fusion`` the reference-image tokens are first updated by
:class:`~lever_plugins.modules.gated_fusion.GatedFusionModule` conditioned on
``Qformer.bert.embeddings(text)``. Training and retrieval share :meth:`fusion_features`, so the gate is
applied identically in both; at initialisation the module is the identity, so the plugin changes
nothing until it is trained.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lever_plugins import catalog
from lever_plugins.models.blip2_components import Blip2PluginModel, image_free_pass
from lever_plugins.modules.gated_fusion import GatedFusionModule
from lever_plugins.runners import distributed as lever_dist
from lever_plugins.schemas.cir import Blip2CirSettings


logger = logging.getLogger(__name__)

# Weights this model has that a BLIP-2 pretrain checkpoint does not.
CIR_NEW_KEYS = ("prompt_tokens",)
PLUGIN_KEYS = ("gated_fusion.",)


class Blip2CirModel(Blip2PluginModel):
    """BLIP-2 composed image retrieval model (registered as ``lever_blip2_cir``)."""

    ARCH = "lever_blip2_cir"
    PRETRAINED_MODEL_CONFIG_DICT = catalog.preset_config_paths(ARCH)
    NEW_KEYS = CIR_NEW_KEYS
    OPTIONAL_PLUGIN_KEYS = PLUGIN_KEYS

    def __init__(self, settings: Blip2CirSettings):
        super().__init__()
        self.build_backbone(settings)
        hidden = settings.qformer.hidden_size
        self.prompt_tokens = nn.Parameter(torch.zeros(1, settings.qformer.num_query_token, hidden))
        self.prompt_tokens.data.normal_(mean=0.0, std=self.Qformer.config.initializer_range)
        self.gated_fusion: Optional[GatedFusionModule] = None
        if settings.use_gated_fusion:
            self.gated_fusion = GatedFusionModule(settings.vision.width, hidden, settings.gated_fusion)
        self.load_checkpoints()

    # ----------------------------------------------------------------------------------- building
    def param_groups_for_optimizer(self, weight_decay: float) -> list[dict]:
        """AdamW groups: the backbone at the base lr, the plugin at ``gated_fusion_lr_scale`` x it.

        With ``decay_all_parameters`` (SPRC's single AdamW group) every trainable weight decays;
        otherwise biases, norms and 1-d weights do not (LAVIS's rule). The plugin's ``alpha`` never
        decays: weight decay would pull the gate's opening back to the identity.
        """
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            plugin = name.startswith(PLUGIN_KEYS)
            lavis_no_decay = param.ndim < 2 or "bias" in name or "ln" in name or "norm" in name.lower()
            no_decay = name == "gated_fusion.alpha" or (not self.settings.decay_all_parameters and lavis_no_decay)
            groups.setdefault((plugin, no_decay), []).append(param)
        return [
            {
                "params": params,
                "weight_decay": 0.0 if no_decay else float(weight_decay),
                "lr_scale": self.settings.gated_fusion_lr_scale if plugin else 1.0,
                "name": f"{'gated_fusion' if plugin else 'backbone'}{'_no_decay' if no_decay else ''}",
            }
            for (plugin, no_decay), params in sorted(groups.items())
        ]

    def plugin_parameter_count(self) -> int:
        return sum(p.numel() for p in self.gated_fusion.parameters()) if self.gated_fusion is not None else 0

    # ----------------------------------------------------------------------------------- encoders
    def tokenize(self, texts: Sequence[str]) -> Any:
        return self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        ).to(self.device)

    def fused_image_tokens(self, image_embeds: torch.Tensor, text_tokens: Any, return_gate: bool = False):
        """Reference-image tokens after the gated-fusion plugin (unchanged when it is off)."""
        if self.gated_fusion is None:
            return (image_embeds, None) if return_gate else image_embeds
        text_embeds = self.Qformer.bert.embeddings(input_ids=text_tokens.input_ids)
        return self.gated_fusion(image_embeds, text_embeds, text_tokens.attention_mask, return_gate=return_gate)

    def fusion_features(
        self, reference_images: torch.Tensor, texts: Sequence[str], return_parts: bool = False
    ) -> Any:
        """Composed query features ``(B, E)`` (L2-normalised) for reference images + modification texts.

        The one path used by training and retrieval. With ``return_parts`` also returns the fused query
        outputs (for the align loss), the text tokens and the per-token gate (or None).
        """
        text_tokens = self.tokenize(texts)
        image_embeds = self.image_tokens(reference_images)
        image_embeds, gate = self.fused_image_tokens(image_embeds, text_tokens, return_gate=True)
        batch = image_embeds.shape[0]
        query_tokens = self.query_tokens.expand(batch, -1, -1)
        num_query = query_tokens.shape[1]
        query_atts = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=self.device)
        attention_mask = torch.cat([query_atts, text_tokens.attention_mask], dim=1)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        fusion_output = self.Qformer.bert(
            text_tokens.input_ids,
            query_embeds=query_tokens,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            return_dict=True,
        )
        fused_queries = fusion_output.last_hidden_state[:, :num_query, :]
        text_output = image_free_pass(self.Qformer, text_tokens.input_ids, attention_mask, fused_queries, "before_text")
        features = F.normalize(self.text_proj(text_output[:, num_query, :]), dim=-1)
        if return_parts:
            return features, fused_queries, text_tokens, attention_mask, gate
        return features

    def target_features(self, images: torch.Tensor) -> torch.Tensor:
        """Per-query target features ``(B, Q, E)`` (L2-normalised)."""
        return self.query_features(self.image_tokens(images))

    @staticmethod
    def similarity(query_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
        """``(B_q, E)`` x ``(B_t, Q, E)`` -> ``(B_q, B_t)``: max over the target's query features."""
        return torch.einsum("be,tqe->btq", query_features, target_features).max(dim=-1).values

    def gate_maps(self, reference_images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Per-image-token gate ``(B, N)`` (CLS first) of the plugin for visualisation."""
        if self.gated_fusion is None:
            raise RuntimeError("gate maps need model.use_gated_fusion: true")
        text_tokens = self.tokenize(texts)
        _, gate = self.fused_image_tokens(self.image_tokens(reference_images), text_tokens, return_gate=True)
        return gate

    # ----------------------------------------------------------------------------------- training
    def example_samples(self, batch_size: int = 2, seed: int = 0) -> dict:
        """A random batch in the layout :meth:`forward` reads (the plugin contract test's input)."""
        texts = ["make it blue", "change it to a square", "make it red", "move it to the top"]
        return {"reference_image": self.example_images(batch_size, seed),
                "target_image": self.example_images(batch_size, seed + 1),
                "text_input": [texts[i % len(texts)] for i in range(batch_size)]}

    def forward(self, samples: Mapping[str, Any]) -> dict:
        """Training losses for a batch of triplets.

        Args:
            samples: ``reference_image`` (B, 3, H, W), ``target_image`` (B, 3, H, W), ``text_input`` list[str].

        Returns:
            dict with ``loss`` (what LAVIS's runner back-propagates) and ``loss_itc``, ``loss_rtc``,
            ``loss_align`` for logging.
        """
        for key in ("reference_image", "target_image", "text_input"):
            if key not in samples:
                raise KeyError(f"lever_blip2_cir.forward: batch has no {key!r} (got {sorted(samples)})")
        fusion_feats, fused_queries, text_tokens, attention_mask, gate = self.fusion_features(
            samples["reference_image"], samples["text_input"], return_parts=True
        )
        target_feats = self.target_features(samples["target_image"])
        # In-batch negatives from every rank (as BLIP-2 / LAPS gather), with gradient to each rank's own
        # targets, so N processes x B compute the loss and update of one process x N*B.
        if self.gather_negatives:
            target_feats = lever_dist.gather_with_grad(target_feats, "lever_blip2_cir target features")
        local = fusion_feats.shape[0]
        targets = torch.arange(local, device=self.device) + (lever_dist.global_offset(local) if self.gather_negatives else 0)
        loss_itc = F.cross_entropy(self.similarity(fusion_feats, target_feats) / self.temp, targets)

        prompt_tokens = self.prompt_tokens.expand(fusion_feats.shape[0], -1, -1)
        # SPRC's rtc pass: [CLS, prompts, text[1:]], read at the [CLS] (index 0).
        prompt_output = image_free_pass(self.Qformer, text_tokens.input_ids, attention_mask, prompt_tokens, "after_cls")
        prompt_feats = F.normalize(self.text_proj(prompt_output[:, 0, :]), dim=-1)
        loss_rtc = F.cross_entropy(self.similarity(prompt_feats, target_feats) / self.temp, targets)
        loss_align = F.mse_loss(fused_queries.mean(dim=1), prompt_tokens.detach().mean(dim=1))

        loss = loss_itc + self.settings.loss_rtc_weight * loss_rtc + self.settings.loss_align_weight * loss_align
        out = {"loss": loss, "loss_itc": loss_itc.detach(), "loss_rtc": loss_rtc.detach(), "loss_align": loss_align.detach()}
        if self.gated_fusion is not None:
            # How far the gate has opened (per-epoch means land in metrics.csv): alpha scales the
            # whole update, gate_mean is the mean per-token gate in [0, 1].
            out["gate_alpha"] = self.gated_fusion.alpha.detach().clone()
            out["gate_mean"] = gate.detach().float().mean()
        return out
