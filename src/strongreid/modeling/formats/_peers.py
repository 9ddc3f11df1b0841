"""Helpers the peer-project formats (fast-reid, torchreid, reid-strong-baseline) share.

Not a format itself: the leading underscore keeps the package from importing it as one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from strongreid.errors import CheckpointError
from strongreid.modeling.checkpoint import nested_state, strip_prefixes


def tensors_of(raw: Mapping[str, Any], nest: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict inside `raw` (under the first of `nest` that holds a mapping, else `raw`
    itself) with wrapper prefixes stripped, and the names of the other top-level entries."""
    state, key = nested_state(raw, nest)
    outer = [str(k) for k in raw if k != key] if key is not None else []
    tensors = {strip_prefixes(str(k)): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors, outer


def block_count(keys: set[str] | list[str], stage: str) -> int:
    """How many residual blocks `stage` (e.g. 'layer3') has, read off the keys `layer3.<i>.`."""
    pattern = re.compile(rf"^{re.escape(stage)}\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def resnet_depth(keys: set[str], prefix: str = "") -> int | None:
    """ResNet-18/34/50/101/152 from the block counts of layer2/layer3 and the block type."""
    bottleneck = f"{prefix}layer1.0.conv3.weight" in keys
    counts = (block_count(keys, f"{prefix}layer2"), block_count(keys, f"{prefix}layer3"))
    table = {(False, (2, 2)): 18, (False, (4, 6)): 34, (True, (4, 6)): 50, (True, (4, 23)): 101,
             (True, (8, 36)): 152}
    return table.get((bottleneck, counts))


def unused_error(path: Path, project: str, arch: str, keys: list[str]) -> CheckpointError:
    """A file of `project` whose tensors `keys` have no place in the model strongreid builds."""
    shown = ", ".join(sorted(keys)[:4]) + (f", ... {len(keys) - 4} more" if len(keys) > 4 else "")
    return CheckpointError(
        f"{path} is a {project} checkpoint of {arch}, but {len(keys)} of its tensors fit no part "
        f"of strongreid's {arch} ({shown}); it was trained with an option strongreid does not "
        "reproduce. Set MODEL.CHECKPOINT_FORMAT strongreid to load it as a plain state dict, or "
        "convert it with the project that wrote it."
    )


def imagenet_pixels() -> dict[str, list[float]]:
    """torchvision's ImageNet statistics in [0, 1] units, what torchreid and fast-reid default to."""
    return {"INPUT.PIXEL_MEAN": [0.485, 0.456, 0.406], "INPUT.PIXEL_STD": [0.229, 0.224, 0.225]}


def training_state(outer: list[str]) -> list[str]:
    """The file's entries beside the model (optimizer, epoch...), listed as deliberately unused."""
    return [f"{name} (training state, not a model tensor)" for name in outer]
