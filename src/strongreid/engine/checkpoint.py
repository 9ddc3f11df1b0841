"""Checkpoints: plain dicts of state dicts, written atomically, read with weights_only=True."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from strongreid.errors import CheckpointError
from strongreid.modeling.loading import read_checkpoint_file


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write to a temp file in the same folder, fsync, then rename.

    A crash or a full disk mid-write leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (no pickled code runs); errors name the file and the fix."""
    return read_checkpoint_file(path, map_location)


def model_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's state dict from a strongreid checkpoint or a bare state dict."""
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict):
        raise CheckpointError("checkpoint entry 'model' is not a state dict")
    return state
