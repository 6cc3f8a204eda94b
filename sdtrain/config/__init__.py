"""Training config: a TOML file checked against a declarative schema.

    cfg = load_config("configs/character.toml", ["network.rank=32"])
    cfg.network.rank, cfg.data.subsets[0].path, cfg.optimizer.unet_lr

Every key, its type, default and help live in `schema.py`; docs/config.md is generated
from it (`python -m sdtrain.config > docs/config.md`).
"""

from sdtrain.config.dump import (
    config_reference_markdown,
    config_to_dict,
    config_to_flat_dict,
    resolved_config_path,
    write_resolved_config,
)
from sdtrain.config.load import apply_overrides, config_from_dict, load_config, parse_override
from sdtrain.config.schema import (
    BUILTIN_MODELS,
    Config,
    DataConfig,
    LogConfig,
    ModelConfig,
    NetworkConfig,
    OptimizerConfig,
    SampleConfig,
    SaveConfig,
    SchedulerConfig,
    SubsetConfig,
    TrainConfig,
    default_resolution,
)
from sdtrain.prompts import parse_prompt_line

__all__ = [
    "BUILTIN_MODELS", "Config", "DataConfig", "LogConfig", "ModelConfig", "NetworkConfig", "OptimizerConfig",
    "SampleConfig", "SaveConfig", "SchedulerConfig", "SubsetConfig", "TrainConfig", "apply_overrides",
    "config_from_dict", "config_reference_markdown", "config_to_dict", "config_to_flat_dict", "default_resolution", "load_config",
    "parse_override", "parse_prompt_line", "resolved_config_path", "write_resolved_config",
]
