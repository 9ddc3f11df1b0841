"""Checkpoints: plain dicts of state dicts, written atomically, read with weights_only=True."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from strongreid.errors import CheckpointError


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
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (check TEST.WEIGHT / MODEL.PRETRAIN_PATH / OUTPUT_DIR)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first}. It is truncated, not a PyTorch file, or holds "
            "pickled objects (reid-strong-baseline's ignite 0.1.2 files pickle whole modules: load "
            "them in that project and save `model.state_dict()` instead)."
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def model_state(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's state dict from a strongreid checkpoint or a bare state dict."""
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict):
        raise CheckpointError("checkpoint entry 'model' is not a state dict")
    return state
