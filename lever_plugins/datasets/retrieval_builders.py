"""LAVIS dataset builders ``lever_flickr30k`` and ``lever_coco``: Karpathy splits + dense captions.

They build from local files only (no ``cache_root``, no download). The config node is validated
against :class:`~lever_plugins.schemas.seps_retrieval.RetrievalDatasetSettings` (COCO: the subclass
with ``fold_images``; :class:`~lever_plugins.datasets.builders.LeverDatasetBuilder`). Val/test datasets carry
``protocol`` (``"flickr"`` or ``"coco"``) and ``fold_images``, which the task reads to add the COCO
1K-fold metrics.
"""
from __future__ import annotations

import logging
from typing import Any

from lever_plugins.datasets.builders import LeverDatasetBuilder, on_main_process
from lever_plugins.schema import expand_path
from lever_plugins.schemas.seps_retrieval import CocoRetrievalDatasetSettings, RetrievalDatasetSettings

logger = logging.getLogger(__name__)


class _RetrievalBuilder(LeverDatasetBuilder):
    settings_cls: type = RetrievalDatasetSettings
    protocol: str = "flickr"

    def build_datasets(self) -> dict[str, Any]:
        from lever_plugins.datasets.retrieval import build_split, load_dense_captions, resolve_under

        settings = self.settings
        root = expand_path(settings.root)
        if settings.generate_demo:
            from lever_plugins.datasets.demo_retrieval import generate_demo_retrieval

            on_main_process(lambda: generate_demo_retrieval(root, image_size=settings.image_size))
        dense_path = resolve_under(root, settings.dense_captions)
        dense = load_dense_captions(dense_path)
        datasets = {}
        for split in settings.splits:
            dataset = build_split(
                split,
                root=root,
                images=settings.images,
                annotation_file=getattr(settings.annotations, split),
                dense=dense,
                dense_path=dense_path,
                image_size=settings.image_size,
                train_augment=settings.train_augment,
                missing_dense_caption=settings.missing_dense_caption,
                policy_key=f"datasets.{self.name}.missing_dense_caption",
                max_train_samples=settings.max_train_samples,
                max_eval_images=settings.max_eval_images,
            )
            if split != "train":
                dataset.protocol = self.protocol
                dataset.fold_images = getattr(settings, "fold_images", None)
                logger.info("%s %s: %d images, %d captions", self.name, split, len(dataset), len(dataset.text))
            else:
                logger.info("%s %s: %d (image, caption) pairs, %d images", self.name, split, len(dataset),
                            len(dataset.image_index))
            datasets[split] = dataset
        return datasets


class Flickr30kRetrievalBuilder(_RetrievalBuilder):
    """``lever_flickr30k``: Flickr30K Karpathy splits (29k / 1k / 1k images, 5 captions each)."""

    name = "lever_flickr30k"


class CocoRetrievalBuilder(_RetrievalBuilder):
    """``lever_coco``: MS-COCO Karpathy splits (113k / 5k / 5k images); test reports 1K folds and 5K."""

    name = "lever_coco"
    settings_cls = CocoRetrievalDatasetSettings
    protocol = "coco"
