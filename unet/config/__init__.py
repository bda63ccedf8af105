"""Typed, validated configuration loaded from YAML (see ``schema`` for every key)."""

from unet.config.load import dump_config, flatten_config, load_config, parse_override, save_config
from unet.config.schema import (
    Config,
    DataConfig,
    EvaluateConfig,
    InferConfig,
    LossConfig,
    ModelConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "DataConfig",
    "EvaluateConfig",
    "InferConfig",
    "LossConfig",
    "ModelConfig",
    "TrackingConfig",
    "TrainConfig",
    "dump_config",
    "flatten_config",
    "load_config",
    "parse_override",
    "save_config",
]
