"""Backbones: `BACKBONES` registry and `create_backbone(name, last_stride)` (also `timm:<name>`)."""

from strongreid.modeling.backbones import (  # noqa: F401  (register)
    densenet,
    fastreid_resnet,
    osnet,
    resnet,
    resnet_ibn,
    rsb_resnet,
    timm_models,
)
from strongreid.modeling.backbones.base import (
    BACKBONES,
    TIMM_PREFIX,
    apply_last_stride,
    create_backbone,
)
from strongreid.modeling.backbones.osnet import OSNet
from strongreid.modeling.backbones.resnet import ResNetBackbone
from strongreid.modeling.backbones.resnet_ibn import IBN, ResNetIBNa
from strongreid.modeling.backbones.timm_models import SENET_NAMES, TimmBackbone

__all__ = [
    "BACKBONES",
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
