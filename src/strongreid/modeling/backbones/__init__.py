"""Backbones: `BACKBONES` registry and `create_backbone(name, last_stride)` (also `timm:<name>`)."""

from strongreid.modeling.backbones import densenet, resnet, resnet_ibn, timm_models  # noqa: F401  (register)
from strongreid.modeling.backbones.base import (
    BACKBONES,
    TIMM_PREFIX,
    apply_last_stride,
    create_backbone,
)
from strongreid.modeling.backbones.resnet import ResNetBackbone
from strongreid.modeling.backbones.resnet_ibn import IBN, ResNetIBNa
from strongreid.modeling.backbones.timm_models import SENET_NAMES, TimmBackbone

__all__ = [
    "BACKBONES",
    "IBN",
    "SENET_NAMES",
    "TIMM_PREFIX",
    "ResNetBackbone",
    "ResNetIBNa",
    "TimmBackbone",
    "apply_last_stride",
    "create_backbone",
]
