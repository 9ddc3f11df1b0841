"""Backbones: `BACKBONES` registry and `create_backbone(name, last_stride)` (also `timm:<name>`).

Every module of this package registers its backbones on import, and all of them are imported
here, so a new backbone is one new file (or one `@BACKBONES.register` in the user's code).
"""

import importlib
import pkgutil

from strongreid.modeling.backbones.base import (
    BACKBONE_FAMILIES,
    BACKBONES,
    TIMM_PREFIX,
    apply_last_stride,
    create_backbone,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

from strongreid.modeling.backbones.osnet import OSNet  # noqa: E402  (after the registration)
from strongreid.modeling.backbones.resnet import ResNetBackbone  # noqa: E402
from strongreid.modeling.backbones.resnet_ibn import IBN, ResNetIBNa  # noqa: E402
from strongreid.modeling.backbones.timm_models import SENET_NAMES, TimmBackbone  # noqa: E402

__all__ = [
    "BACKBONES",
    "BACKBONE_FAMILIES",
    "IBN",
    "OSNet",
    "SENET_NAMES",
    "TIMM_PREFIX",
    "ResNetBackbone",
    "ResNetIBNa",
    "TimmBackbone",
    "apply_last_stride",
    "create_backbone",
]
