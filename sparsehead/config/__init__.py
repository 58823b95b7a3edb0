"""Configuration: the structured schema and the YAML/override loader."""

from .load import (
    CONFIG_DIR,
    DEFAULT_CONFIG,
    ConfigError,
    load_config,
    packaged_configs,
    parse_overrides,
    resolve_config,
    validate_config,
)
from .schema import Config

__all__ = [
    "CONFIG_DIR", "Config", "ConfigError", "DEFAULT_CONFIG", "load_config", "packaged_configs", "parse_overrides",
    "resolve_config", "validate_config",
]
