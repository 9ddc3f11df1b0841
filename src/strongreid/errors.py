"""User-facing errors: the CLI prints their message alone, without a traceback."""

from __future__ import annotations


class StrongReIDError(Exception):
    """An error the user can fix (bad config, missing file, wrong checkpoint...).

    The message must name the file, key or value at fault and say what to do.
    """


class ConfigError(StrongReIDError):
    """A configuration key or value is invalid."""


class DatasetError(StrongReIDError):
    """A dataset folder, list or image is missing or unreadable."""


class CheckpointError(StrongReIDError):
    """A checkpoint is missing, corrupt or belongs to another model."""
