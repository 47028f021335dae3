"""Settings of the toy plugin: one dataclass per block, pure Python (``list``/``validate`` import it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lever_plugins.schema import Settings, setting


@dataclass(kw_only=True)
class ToyAdapterSettings(Settings):
    """Settings of :class:`toy_lever_plugin.module.ToyAdapter` (its width comes from the backbone)."""

    expansion: int = setting(2, help="hidden width of the adapter MLP = width x expansion", ge=1)
    scale_init: float = setting(0.0, help="initial residual scale; 0 = the identity at init")


@dataclass(kw_only=True)
class ToyModelSettings(Settings):
    """``model:`` block of ``arch: toy_regressor``."""

    arch: Literal["toy_regressor"] = setting(help="registered model name")
    model_type: Literal["tiny"] = setting(help="size preset")
    input_dim: int = setting(6, help="features per sample", ge=1)
    width: int = setting(16, help="width of the frozen encoder's output", ge=1)
    freeze_encoder: bool = setting(True, help="keep the random encoder fixed (as a pretrained backbone)")
    use_adapter: bool = setting(False, help="apply ToyAdapter to the encoder features")
    adapter: ToyAdapterSettings = setting(default_factory=ToyAdapterSettings, help="ToyAdapter settings")


@dataclass(kw_only=True)
class ToyNumbersSettings(Settings):
    """``datasets.toy_numbers`` block: random features and a linear target, made in memory."""

    data_type: Literal["images"] = setting("images", help="LAVIS data type (LAVIS's builders read it)")
    count: int = setting(32, help="samples per split", ge=1)
    input_dim: int = setting(6, help="features per sample (must equal model.input_dim)", ge=1)


def cross_block_problems(data: dict) -> list[str]:
    """The dataset's feature count must be the model's."""
    wanted, given = data["model"]["input_dim"], data["datasets"]["toy_numbers"]["input_dim"]
    return [] if wanted == given else [f"datasets.toy_numbers.input_dim: {given} features, but model.input_dim is {wanted}"]


def parameter_count(data: dict) -> int:
    """Trainable parameters of the recipe's toy model, without building it."""
    model = data["model"]
    width, hidden = model["width"], model["width"] * model["adapter"]["expansion"]
    adapter = (width * hidden + hidden) + (hidden * width + width) + 1 if model["use_adapter"] else 0
    encoder = 0 if model["freeze_encoder"] else model["input_dim"] * width + width
    return encoder + adapter + width + 1


def describe_plan(data: dict) -> list[str]:
    """``--dry-run`` lines of ``toy_regressor``."""
    adapter = "ToyAdapter on the encoder features" if data["model"]["use_adapter"] else "no adapter"
    return [f"#   toy_regressor: {adapter}; {parameter_count(data):,} trainable parameters"]

