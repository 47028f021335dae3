"""``lever_vqa_icl``: LAVIS builder of pointer-selector training data from VQAv2 / OK-VQA files.

Builds ``{"train", "val"}`` :class:`~lever_plugins.datasets.vqa_icl.PointerBeamDataset` s from the
supporting-set questions + annotations, the feature cache (``features_dir``) and the beam-search
files (``beam_dir``), split by question_id (``val_fraction``). Local files only; the config node is
validated against :class:`~lever_plugins.schemas.icl.VqaIclDatasetSettings`.

``features_dir`` / ``beam_dir`` may be null in a recipe: the ``lever_icl_selection`` task fills them
with ``<run.output_dir>/embed`` and ``<run.output_dir>/beam_search`` (where its stages write) before
it builds the datasets. Used on its own, the builder needs them set.
"""
from __future__ import annotations

from lever_plugins import catalog
from lever_plugins.datasets.builders import _validated
from lever_plugins.schema import RecipeError
from lever_plugins.schemas.icl import VqaIclDatasetSettings

from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder  # noqa: E402  (LAVIS imported above)


class VqaIclBuilder(BaseDatasetBuilder):
    """``lever_vqa_icl``: train / val splits of beam-search queries (see the module docstring)."""

    DATASET_CONFIG_DICT = {"default": catalog.dataset_config_path("lever_vqa_icl")}

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.settings: VqaIclDatasetSettings = _validated(VqaIclDatasetSettings, self.config, "lever_vqa_icl")

    def build_datasets(self):
        from lever_plugins.icl.pipeline import build_pointer_datasets, load_train_split

        missing = [key for key in ("features_dir", "beam_dir") if not getattr(self.settings, key)]
        if missing:
            raise RecipeError([f"datasets.lever_vqa_icl.{key}: not set (the lever_icl_selection task fills it from "
                               "run.output_dir; set it when using the builder alone)" for key in missing])
        settings = self.settings
        return build_pointer_datasets(settings, load_train_split(settings), str(settings.features_dir), str(settings.beam_dir))
