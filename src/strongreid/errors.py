"""User-facing errors: the CLI prints their message alone, without a traceback."""

from __future__ import annotations

import re


class StrongReIDError(Exception):
    """An error the user can fix (bad config, missing file, wrong checkpoint...).

    The message must name the file, key or value at fault and say what to do.

    Raised in a DataLoader worker, torch re-raises it in the main process as
    `type(exc)("Caught <Name> in DataLoader worker process N.\nOriginal Traceback ...")`: the
    constructor recognises that message and keeps the original one, so the user reads the same
    single message as in a run without workers (and the type stays the same).
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught "):
            args = (_unwrap_worker_message(args[0], type(self).__name__),)
        super().__init__(*args)


def _unwrap_worker_message(text: str, name: str) -> str:
    """The original message inside torch's worker re-raise text (unchanged if it is not one)."""
    if not re.match(r"Caught \w+ in .*\.\nOriginal Traceback", text):
        return text
    # The traceback ends with "<module>.<Name>: <message>" (possibly several lines).
    found = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(name)}: ", text, flags=re.MULTILINE))
    return text[found[-1].end():].rstrip("\n") if found else text


class ConfigError(StrongReIDError):
    """A configuration key or value is invalid."""


class DatasetError(StrongReIDError):
    """A dataset folder, list or image is missing or unreadable."""


class CheckpointError(StrongReIDError):
    """A checkpoint is missing, corrupt or belongs to another model."""
