"""The toy plugin's LAVIS classes (imported only when registering): a model, a dataset builder, a task."""
from __future__ import annotations

from typing import Any

from lever_plugins.compat import import_lavis

import_lavis()

import torch  # noqa: E402
from lavis.models.base_model import BaseModel  # noqa: E402

from lever_plugins import catalog, recipes  # noqa: E402
from lever_plugins.datasets.builders import LeverDatasetBuilder  # noqa: E402
from lever_plugins.tasks.base import LeverTask  # noqa: E402
from toy_lever_plugin.module import ToyAdapter  # noqa: E402
from lever_plugins.schemas.run import RunSettings  # noqa: E402
from toy_lever_plugin.settings import ToyModelSettings, ToyNumbersSettings  # noqa: E402


class ToyRegressor(BaseModel):
    """A frozen random encoder, an optional :class:`ToyAdapter`, and a linear head trained with MSE."""

    PRETRAINED_MODEL_CONFIG_DICT = catalog.preset_config_paths("toy_regressor")

    def __init__(self, settings: ToyModelSettings) -> None:
        super().__init__()
        self.settings = settings
        self.encoder = torch.nn.Linear(settings.input_dim, settings.width)
        self.encoder.requires_grad_(not settings.freeze_encoder)
        self.adapter = ToyAdapter(settings.adapter, width=settings.width) if settings.use_adapter else None
        self.head = torch.nn.Linear(settings.width, 1)

    def train(self, mode: bool = True) -> "ToyRegressor":
        super().train(mode)
        if self.settings.freeze_encoder:
            self.encoder.eval()  # a frozen backbone runs as in evaluation
        return self

    @classmethod
    def from_config(cls, cfg: Any) -> "ToyRegressor":
        return cls(recipes.model_settings_from_config(cfg))

    def example_samples(self, batch_size: int = 2, seed: int = 0) -> dict:
        generator = torch.Generator().manual_seed(seed)
        return {"features": torch.randn(batch_size, self.settings.input_dim, generator=generator),
                "target": torch.randn(batch_size, generator=generator)}

    def forward(self, samples: dict) -> dict:
        features = self.encoder(samples["features"])
        if self.adapter is not None:
            features = self.adapter(features)
        prediction = self.head(torch.tanh(features)).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(prediction, samples["target"])}


class NumbersDataset(torch.utils.data.Dataset):
    """``count`` random feature rows with a fixed linear target (the same rule in every split)."""

    def __init__(self, count: int, input_dim: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.features = torch.randn(count, input_dim, generator=generator)
        rule = torch.linspace(-1.0, 1.0, input_dim)
        self.targets = torch.tanh(self.features @ rule)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict:
        return {"features": self.features[index], "target": self.targets[index]}

    def collater(self, samples: list) -> dict:
        return torch.utils.data.default_collate(samples)


class ToyNumbersBuilder(LeverDatasetBuilder):
    """``toy_numbers``: train and val splits made in memory (no files)."""

    name = "toy_numbers"
    settings_cls = ToyNumbersSettings

    def build_datasets(self) -> dict:
        return {split: NumbersDataset(self.settings.count, self.settings.input_dim, seed)
                for split, seed in (("train", 0), ("val", 1))}


class ToyTask(LeverTask):
    """Trains with the shared loop; validates the mean squared error (lower is better)."""

    settings_cls = RunSettings

    @torch.no_grad()
    def evaluation(self, model, data_loader, cuda_enabled=True) -> list:
        model = getattr(model, "module", model)
        return [(float(model(batch)["loss"]) * len(batch["target"]), len(batch["target"])) for batch in data_loader]

    def after_evaluation(self, val_result, split_name, epoch, **kwargs) -> dict:
        mse = sum(total for total, _ in val_result) / sum(count for _, count in val_result)
        return {"mse": mse, "agg_metrics": -mse}
