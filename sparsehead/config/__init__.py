"""Configuration: the structured schema and the YAML/override loader."""

from .load import DEFAULT_CONFIG, ConfigError, load_config, parse_overrides, validate_config
from .schema import Config

__all__ = ["Config", "ConfigError", "DEFAULT_CONFIG", "load_config", "parse_overrides", "validate_config"]
