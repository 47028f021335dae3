"""``lever_vqa_icl`` / ``lever_coco_caption_icl``: LAVIS builders of pointer-selector training data from
VQAv2 / OK-VQA files or COCO captions.

Builds ``{"train", "val"}`` :class:`~lever_plugins.icl.beam_dataset.PointerBeamDataset` s from the
supporting-set questions + annotations, the feature cache (``features_dir``) and the beam-search
files (``beam_dir``), split by question_id (``val_fraction``). Local files only; the config node is
validated against :class:`~lever_plugins.schemas.icl.VqaIclDatasetSettings`.

``features_dir`` / ``beam_dir`` may be null in a recipe: the ``lever_icl_selection`` task fills them
with ``<run.output_dir>/embed`` and ``<run.output_dir>/beam_search`` (where its stages write) before
it builds the datasets. Used on its own, the builder needs them set.
"""
from __future__ import annotations

from lever_plugins.datasets.builders import LeverDatasetBuilder
from lever_plugins.schema import RecipeError
from lever_plugins.schemas.icl import CocoCaptionIclDatasetSettings, VqaIclDatasetSettings


class VqaIclBuilder(LeverDatasetBuilder):
    """``lever_vqa_icl``: train / val splits of beam-search queries (see the module docstring)."""

    name = "lever_vqa_icl"
    settings_cls = VqaIclDatasetSettings
    settings: VqaIclDatasetSettings

    def build_datasets(self):
        from lever_plugins.icl.pipeline import build_pointer_datasets, load_train_split

        missing = [key for key in ("features_dir", "beam_dir") if not getattr(self.settings, key)]
        if missing:
            raise RecipeError([f"datasets.{self.name}.{key}: not set (the lever_icl_selection task fills it from "
                               "run.output_dir; set it when using the builder alone)" for key in missing])
        settings = self.settings
        return build_pointer_datasets(settings, load_train_split(settings), str(settings.features_dir), str(settings.beam_dir))


class CocoCaptionIclBuilder(VqaIclBuilder):
    """``lever_coco_caption_icl``: the same train / val splits of beam-search queries, from COCO captions
    (Karpathy ``dataset_coco.json`` + images; :mod:`lever_plugins.icl.caption_data`)."""

    name = "lever_coco_caption_icl"
    settings_cls = CocoCaptionIclDatasetSettings
    settings: CocoCaptionIclDatasetSettings
