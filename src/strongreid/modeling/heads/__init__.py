"""Heads: what turns the backbone's map into logits and the test feature.

`HEADS` (MODEL.HEAD) maps names to model classes; every module of this package registers its
heads on import and all of them are imported here, so a new head is one new file (or one
`@HEADS.register` class in the user's code). The shared pieces: pooling, BNNeck, init.
"""

import importlib
import pkgutil

from strongreid.modeling.heads.bnneck import (
    make_bnneck,
    weights_init_classifier,
    weights_init_kaiming,
)
from strongreid.modeling.heads.pooling import GeM, GlobalAvgPool, build_pooling
from strongreid.modeling.heads.registry import HEADS, build_head_model

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "HEADS",
    "GeM",
    "GlobalAvgPool",
    "build_head_model",
    "build_pooling",
    "make_bnneck",
    "weights_init_classifier",
    "weights_init_kaiming",
]
