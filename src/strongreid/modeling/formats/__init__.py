"""Checkpoint formats of other projects, converted into strongreid's `ReIDModel`.

People start from published files: fast-reid's and torchreid's model zoos, layumi's
`net_last.pth`, reid-strong-baseline's releases. Each such format is one registered class that
recognises its files by their keys and renames their tensors into a ReIDModel state dict, and says
which config values (backbone, head, input size, pixel statistics, resize filter...) that model
needs:

    @CHECKPOINT_FORMATS.register("myproject")
    class MyProject:
        description = "MyProject's train.py checkpoints"

        def detect(self, raw: Mapping[str, Any]) -> bool: ...
        def convert(self, raw: Mapping[str, Any], path: Path) -> Converted: ...

`raw` is what `torch.load(path, weights_only=True)` returned (always a mapping). With
MODEL.CHECKPOINT_FORMAT 'auto' the formats are asked in registration order and the first whose
`detect` is true converts the file; a file no format claims is read as a strongreid checkpoint
(or a bare ReIDModel / reid-strong-baseline state dict). `convert` raises CheckpointError, naming
the file, for a file of its project that it cannot map (an architecture it does not know).
The loader then builds the model with `overrides` (and `defaults`, where the user's config file
or command line did not set the key), loads `state` strictly and reports any tensor of the model
left unfilled, so a converter cannot silently drop weights. `warnings` say, for a guessed key, what
a wrong guess costs; the loader logs those whose guess it used (`strongreid test` also writes them
to results.json).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from strongreid.registry import Registry


@dataclass
class Converted:
    """A foreign checkpoint in strongreid's terms."""

    state: dict[str, torch.Tensor]  # ReIDModel state-dict keys
    overrides: dict[str, Any]  # dotted config keys the model needs, e.g. {"MODEL.NAME": "resnet50"}
    num_classes: int  # rows of the checkpoint's classifier (1 when it has none)
    source: str  # what the file is, for logs and messages: "fast-reid BoT R50"
    # Tensors of the file deliberately not used (e.g. an ImageNet fc), so a report can list them.
    ignored: list[str] = field(default_factory=list)
    # Guesses the file cannot confirm: used unless the user's config sets the key.
    defaults: dict[str, Any] = field(default_factory=dict)
    # Per guessed key, what goes wrong if the guess is wrong and how to set it (logged when used).
    warnings: dict[str, str] = field(default_factory=dict)


class CheckpointFormat(Protocol):
    description: str

    def detect(self, raw: Mapping[str, Any]) -> bool: ...

    def convert(self, raw: Mapping[str, Any], path: Path) -> Converted: ...


CHECKPOINT_FORMATS: Registry[type[CheckpointFormat]] = Registry("checkpoint format")

# The native format: not a registry entry, it is what remains when no foreign format claims a file.
NATIVE = "strongreid"


def detect_format(raw: Mapping[str, Any]) -> str:
    """The name of the first registered format that claims `raw`, else 'strongreid'."""
    for name in CHECKPOINT_FORMATS.names_in_order():
        if CHECKPOINT_FORMATS.get(name)().detect(raw):
            return name
    return NATIVE


__all__ = ["CHECKPOINT_FORMATS", "NATIVE", "CheckpointFormat", "Converted", "detect_format"]


def _register_builtin_formats() -> None:
    # Every module of this package registers its format on import; importing them all here keeps
    # adding a format to one new file.
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_register_builtin_formats()
