"""``lever_pointer_selector``: the pure-torch pointer selectors V1/V2/V3 as a LAVIS model.

The recipe's ``model:`` block (:class:`~lever_plugins.schemas.icl.PointerSelectorSettings`) is
validated; its ``selector_settings()`` (the ``PointerSelectorV{1,2,3}Settings`` of ``model_type``) build
the selector with ``build_model_v{1,2,3}``. ``forward(samples)`` takes a batch of
:class:`~lever_plugins.icl.beam_dataset.PointerBeamDataset` and returns ``loss`` plus the scalar
parts the training loop logs: ``ce_loss``, ``ranking_loss`` (V3) and ``logits_std`` (the spread of
the available candidates' logits; healthy 0.8-1.5 per the seeds).

RADI losses (V3 ``radi_*``) distil from a trained selector: ``teacher_checkpoint`` is a checkpoint
of an earlier ``lever_pointer_selector`` run; its own recipe (saved in the checkpoint) rebuilds the
teacher, which stays frozen and is not part of this model's state dict. Both checkpoints are read
weights-only and loaded strictly (:mod:`lever_plugins.checkpoints`): a missing or extra weight is an
error naming the file.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import torch

from lever_plugins import catalog
from lever_plugins.checkpoints import load_checked, read_torch_file
from lever_plugins.compat import import_lavis
from lever_plugins.modules.pointer import build_model_v1, build_model_v2, build_model_v3, mc_dropout_logits
from lever_plugins.schema import RecipeError
from lever_plugins.schemas.icl import PointerSelectorSettings
from lever_plugins.schemas.pointer import pointer_parameter_count

import_lavis()

from lavis.models.base_model import BaseModel  # noqa: E402

logger = logging.getLogger(__name__)


def settings_from_block(block: Mapping) -> PointerSelectorSettings:
    """Validate a ``model:`` block (preset merged under it); a :class:`RecipeError` lists every problem."""
    from lever_plugins.recipes import model_settings_from_config

    return model_settings_from_config(block)


def _model_state(checkpoint: dict) -> dict:
    """The model state dict of a runner checkpoint (``{"model": ..., ...}``) or of a bare state dict."""
    return checkpoint["model"] if isinstance(checkpoint.get("model"), dict) else checkpoint


class PointerSelectorModel(BaseModel):
    """Registered as ``lever_pointer_selector``; ``self.selector`` is the pure-torch selector."""

    PRETRAINED_MODEL_CONFIG_DICT = catalog.preset_config_paths("lever_pointer_selector")

    def __init__(self, settings: PointerSelectorSettings):
        super().__init__()
        self.settings = settings
        builder = {"v1": build_model_v1, "v2": build_model_v2, "v3": build_model_v3}[settings.model_type]
        self.selector = builder(settings.selector_settings())
        teacher = None
        if settings.model_type == "v3" and settings.ranking_loss_type.startswith("radi_"):
            teacher = self._load_teacher(str(settings.teacher_checkpoint))
        # Not registered as a submodule: frozen, outside the state dict and the optimiser.
        object.__setattr__(self, "_teacher", teacher)
        if settings.finetuned:
            source = f"model.finetuned {settings.finetuned}"
            load_checked(self, _model_state(read_torch_file(settings.finetuned, source)), source, refuse_unexpected=True)
            logger.info("lever_pointer_selector: weights from %s", settings.finetuned)

    @classmethod
    def from_config(cls, cfg: Any) -> "PointerSelectorModel":
        return cls(settings_from_block(cfg))

    def _load_teacher(self, path: str) -> torch.nn.Module:
        source = f"model.teacher_checkpoint {path}"
        checkpoint = read_torch_file(path, source)
        if "config" not in checkpoint or "model" not in checkpoint:
            raise RecipeError([f"model.teacher_checkpoint: {path} is not a lever_pointer_selector run checkpoint (no config/model)"])
        block = dict(checkpoint["config"]["model"])
        block.pop("finetuned", None)
        teacher_settings = settings_from_block(block)
        if teacher_settings.model_type == "v3" and teacher_settings.ranking_loss_type.startswith("radi_"):
            raise RecipeError([f"model.teacher_checkpoint: {path} is itself a RADI student; use a V1/V2/V3 teacher"])
        for key in ("d_model", "K"):
            if getattr(teacher_settings, key) != getattr(self.settings, key):
                raise RecipeError([f"model.teacher_checkpoint: the teacher has {key} = {getattr(teacher_settings, key)}, "
                                   f"this model {getattr(self.settings, key)}"])
        teacher = PointerSelectorModel(teacher_settings)
        load_checked(teacher, checkpoint["model"], source, refuse_unexpected=True)
        for param in teacher.parameters():
            param.requires_grad = False
        logger.info("lever_pointer_selector: RADI teacher %s from %s", teacher_settings.model_type, path)
        return teacher.selector

    def parameter_count(self) -> int:
        settings = self.settings
        return pointer_parameter_count(settings.d_model, settings.hidden_dim, settings.model_type)

    def teacher_logits(self, samples: Mapping[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """``(T, B, S, K)`` MC-dropout logits of the RADI teacher, or None without one."""
        if self._teacher is None:
            return None
        teacher = self._teacher.to(samples["query_emb"].device)
        return mc_dropout_logits(teacher, samples["query_emb"], samples["cand_emb"], samples["labels"],
                                 num_samples=self.settings.radi_mc_samples)

    def selector_outputs(self, samples: Mapping[str, torch.Tensor]) -> dict:
        """The selector's teacher-forced outputs on a batch (``logits (B, S, K)``, losses, ``logits_std``)."""
        for key in ("query_emb", "cand_emb", "labels"):
            if key not in samples:
                raise KeyError(f"lever_pointer_selector.forward: batch has no {key!r} (got {sorted(samples)})")
        return self.selector(
            samples["query_emb"], samples["cand_emb"], samples["labels"], beam_scores=samples.get("beam_scores"),
            return_loss=True, teacher_logits=self.teacher_logits(samples),
        )

    def example_samples(self, batch_size: int = 2, seed: int = 0) -> dict:
        """A random batch in the layout :meth:`forward` reads (the plugin contract test's input): each
        query's ``shot_num`` labels are distinct pool indices."""
        generator = torch.Generator().manual_seed(seed)
        settings = self.settings
        labels = torch.stack([torch.randperm(settings.K, generator=generator)[: settings.shot_num]
                              for _ in range(batch_size)])
        return {"query_emb": torch.randn(batch_size, settings.d_model, generator=generator),
                "cand_emb": torch.randn(batch_size, settings.K, settings.d_model, generator=generator),
                "labels": labels, "beam_scores": torch.rand(batch_size, settings.shot_num, generator=generator)}

    def forward(self, samples: Mapping[str, torch.Tensor]) -> dict:
        """Training losses on a batch of beam-search samples.

        Args:
            samples: ``query_emb (B, d)``, ``cand_emb (B, K, d)``, ``labels (B, S)``, ``beam_scores (B, S)``.

        Returns:
            ``loss`` (back-propagated), ``ce_loss``, ``ranking_loss`` (V3) and ``logits_std`` (detached).
        """
        out = self.selector_outputs(samples)
        result = {"loss": out["loss"], "ce_loss": out["ce_loss"].detach(), "logits_std": out["logits_std"].detach()}
        if "ranking_loss" in out:
            result["ranking_loss"] = out["ranking_loss"].detach()
        return result

    @torch.no_grad()
    def predict(self, query_emb: torch.Tensor, cand_emb: torch.Tensor, top_k: int = 1):
        """``self.selector.predict``: ``(B, shot_num)`` pool indices and their probabilities."""
        return self.selector.predict(query_emb, cand_emb, top_k=top_k)
