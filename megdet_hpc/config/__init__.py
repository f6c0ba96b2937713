"""Configuration: typed schema, YAML loading with inheritance, overrides and validation."""

from megdet_hpc.config.load import (
    ConfigError,
    from_dict,
    load_config,
    parse_overrides,
    scale_to_total_batch,
    to_dict,
    validate,
)
from megdet_hpc.config.schema import Config

__all__ = [
    "Config",
    "ConfigError",
    "from_dict",
    "load_config",
    "parse_overrides",
    "scale_to_total_batch",
    "to_dict",
    "validate",
]
