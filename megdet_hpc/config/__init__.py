"""Configuration: typed frozen schema, YAML loading with inheritance, overrides and validation."""

from megdet_hpc.config.load import (
    ConfigError,
    architecture_differences,
    bundled_configs,
    default_config_for,
    from_dict,
    load_config,
    parse_overrides,
    resolve_config_path,
    scale_to_total_batch,
    to_dict,
    updated,
    validate,
)
from megdet_hpc.config.schema import Config

__all__ = [
    "Config",
    "ConfigError",
    "architecture_differences",
    "bundled_configs",
    "default_config_for",
    "from_dict",
    "load_config",
    "parse_overrides",
    "resolve_config_path",
    "scale_to_total_batch",
    "to_dict",
    "updated",
    "validate",
]
