"""Data pipeline: image decoding, transforms, samplers and loaders.

Names are resolved lazily so that importing `strongreid.data.datasets` (the CLI's `stats`)
does not pull in torch and torchvision.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "read_image": "strongreid.data.image",
    "ImageDataset": "strongreid.data.image",
    "RandomErasing": "strongreid.data.transforms",
    "build_transforms": "strongreid.data.transforms",
    "RandomIdentitySampler": "strongreid.data.samplers",
    "DistributedIdentitySampler": "strongreid.data.samplers",
    "ShuffledSampler": "strongreid.data.samplers",
    "build_train_loader": "strongreid.data.build",
    "build_test_loader": "strongreid.data.build",
    "build_train_sampler": "strongreid.data.build",
    "collate_batch": "strongreid.data.build",
    "seed_worker": "strongreid.data.build",
}

__all__ = [
    "DistributedIdentitySampler",
    "ImageDataset",
    "RandomErasing",
    "RandomIdentitySampler",
    "ShuffledSampler",
    "build_test_loader",
    "build_train_loader",
    "build_train_sampler",
    "build_transforms",
    "collate_batch",
    "read_image",
    "seed_worker",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'strongreid.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
