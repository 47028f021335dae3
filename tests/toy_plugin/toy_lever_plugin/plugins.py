"""The toy plugin's catalogue rows (pure data: ``list`` and ``validate`` import it)."""
import os

from lever_plugins.catalog import PluginSpec

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

PLUGINS = [
    PluginSpec(kind="model", name="toy_regressor", target="toy_lever_plugin.lavis_parts:ToyRegressor",
               purpose="a frozen encoder + optional ToyAdapter + linear head (the contract's fourth plugin)",
               settings="toy_lever_plugin.settings:ToyModelSettings", recipe_block="model", model_types=("tiny",),
               tiny_model_types=("tiny",), describe="toy_lever_plugin.settings:describe_plan", config_root=CONFIGS),
    PluginSpec(kind="dataset", name="toy_numbers", target="toy_lever_plugin.lavis_parts:ToyNumbersBuilder",
               purpose="random features with a fixed target rule, made in memory",
               settings="toy_lever_plugin.settings:ToyNumbersSettings", recipe_block="datasets.toy_numbers",
               config_root=CONFIGS),
    PluginSpec(kind="task", name="toy_regression", target="toy_lever_plugin.lavis_parts:ToyTask",
               purpose="trains the toy model; validates its mean squared error",
               settings="lever_plugins.schemas.run:RunSettings", recipe_block="run",
               cross_check="toy_lever_plugin.settings:cross_block_problems"),
]
