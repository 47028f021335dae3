"""LAVIS dataset builders for our plugins (registered by ``lever_plugins.registry``).

They build from local files only: no ``cache_root``, no download step. Every builder subclasses
:class:`LeverDatasetBuilder`: its config node is validated against the dataset's settings dataclass, so a
mistyped key fails instead of being ignored.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from lever_plugins import catalog
from lever_plugins.compat import import_lavis
from lever_plugins.recipes import to_plain
from lever_plugins.schema import RecipeError, expand_path, from_mapping
from lever_plugins.schemas.cir import CirrDatasetSettings, FashionIQDatasetSettings

import_lavis()

from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder  # noqa: E402

from lever_plugins.runners import distributed as lever_dist  # noqa: E402

logger = logging.getLogger(__name__)


class LeverDatasetBuilder(BaseDatasetBuilder):
    """Base of our builders: ``name`` (the catalogue's dataset name) selects the default config, and the
    config node is validated against ``settings_cls`` into ``self.settings``."""

    name: str = ""
    settings_cls: type

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            cls.DATASET_CONFIG_DICT = {"default": catalog.dataset_config_path(cls.name)}

    def __init__(self, cfg=None):
        super().__init__(cfg)
        problems: list[str] = []
        self.settings = from_mapping(self.settings_cls, to_plain(self.config) or {}, f"datasets.{self.name}", problems)
        if problems:
            raise RecipeError(problems)


def on_main_process(write: Callable[[], Any]) -> None:
    """``write()`` on the main process while the others wait (generated demo data is written once)."""
    if lever_dist.is_main_process():
        write()
    lever_dist.barrier()


def caption_processor(name: str):
    """The recipe's ``caption_processor`` as a function on caption strings (None: unchanged)."""
    from lever_plugins.datasets.text import blip_caption

    return {"blip_caption": blip_caption, "none": None}[name]


class CirrBuilder(LeverDatasetBuilder):
    """``lever_cirr``: CIRR triplets; val/test datasets carry their split's gallery as ``.gallery``."""

    name = "lever_cirr"
    settings_cls = CirrDatasetSettings
    settings: CirrDatasetSettings

    def build_datasets(self):
        from lever_plugins.datasets.cirr import CirrGalleryDataset, CirrTripletDataset
        from lever_plugins.datasets.transforms import cir_image_transform

        settings = self.settings
        root = expand_path(settings.root)
        if settings.generate_demo:
            from lever_plugins.datasets.demo_cirr import generate_demo_cirr

            on_main_process(lambda: generate_demo_cirr(root, image_size=settings.image_size))
        datasets = {}
        for split in settings.splits:
            train = split == "train"
            transform = cir_image_transform(settings.image_size, settings.target_ratio, train=train)
            dataset = CirrTripletDataset(root, split, transform, caption_processor(settings.caption_processor),
                                         load_target_image=True if train else False)
            limit = settings.max_train_samples if train else settings.max_eval_samples
            if limit is not None:
                dataset.triplets = dataset.triplets[:limit]
            if not train:
                dataset.gallery = CirrGalleryDataset(root, split, transform)
            datasets[split] = dataset
            logger.info("lever_cirr %s: %d triplets", split, len(dataset))
        return datasets


class FashionIQBuilder(LeverDatasetBuilder):
    """``lever_fashioniq``: FashionIQ triplets. ``train`` holds every chosen category together; ``val``
    holds them too, with one gallery per category as ``.galleries`` (scored per category)."""

    name = "lever_fashioniq"
    settings_cls = FashionIQDatasetSettings
    settings: FashionIQDatasetSettings

    def build_datasets(self):
        from lever_plugins.datasets.fashioniq import FashionIqGalleryDataset, FashionIqTripletDataset
        from lever_plugins.datasets.transforms import cir_image_transform

        settings = self.settings
        root = expand_path(settings.root)
        datasets = {}
        for split in settings.splits:
            train = split == "train"
            transform = cir_image_transform(settings.image_size, settings.target_ratio, train=train)
            dataset = FashionIqTripletDataset(
                root, split, transform, categories=settings.categories, train=train, load_target_image=train,
                image_extension=settings.image_extension, text_transform=caption_processor(settings.caption_processor),
                max_samples_per_category=settings.max_train_samples if train else settings.max_eval_samples,
            )
            if not train:
                dataset.galleries = {
                    category: FashionIqGalleryDataset(root, category, split, transform, image_extension=settings.image_extension)
                    for category in settings.categories
                }
            datasets[split] = dataset
            logger.info("lever_fashioniq %s (%s): %d triplets", split, ", ".join(settings.categories), len(dataset))
        return datasets


def build_eval_split(name: str, block: dict, split: str):
    """One evaluation split of a CIR dataset block of a resolved recipe (``lever_cirr`` / ``lever_fashioniq``),
    built by its builder exactly as a run builds it."""
    from omegaconf import OmegaConf

    builders = {"lever_cirr": CirrBuilder, "lever_fashioniq": FashionIQBuilder}
    if name not in builders:
        raise RecipeError([f"datasets.{name}: gate maps need a CIR dataset ({', '.join(builders)})"])
    config = OmegaConf.create({**block, "splits": [split], "generate_demo": False} if name == "lever_cirr"
                              else {**block, "splits": [split]})
    return builders[name](config).build_datasets()[split]
