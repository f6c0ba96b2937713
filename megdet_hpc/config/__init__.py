"""Configuration: typed frozen schema, YAML loading with inheritance, overrides and validation."""

from megdet_hpc.config.batch import BatchPlan
from megdet_hpc.config.load import (
    ARCHITECTURE_KEYS,
    ConfigError,
    architecture_differences,
    bundled_configs,
    default_config_for,
    default_config_name,
    from_dict,
    load_config,
    parse_overrides,
    resolve_config_path,
    scale_to_total_batch,
    to_dict,
    updated,
    validate,
)
from megdet_hpc.config.schema import DEFAULT_IMAGES_PER_GPU, Config

__all__ = [
    "ARCHITECTURE_KEYS",
    "DEFAULT_IMAGES_PER_GPU",
    "BatchPlan",
    "Config",
    "ConfigError",
    "architecture_differences",
    "bundled_configs",
    "default_config_for",
    "default_config_name",
    "from_dict",
    "load_config",
    "parse_overrides",
    "resolve_config_path",
    "scale_to_total_batch",
    "to_dict",
    "updated",
    "validate",
]
