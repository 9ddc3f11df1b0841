"""Configuration: defaults, loading with upstream compatibility, validation."""

from strongreid.config.defaults import _C
from strongreid.config.loader import (
    dataset_names,
    flag,
    get_cfg_defaults,
    load_config,
    save_config,
)

__all__ = ["_C", "dataset_names", "flag", "get_cfg_defaults", "load_config", "save_config"]
