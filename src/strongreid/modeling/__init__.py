"""Models: backbones, the BNNeck head, ReIDModel, and weight loading."""

from strongreid.modeling.backbones import BACKBONES, create_backbone
from strongreid.modeling.baseline import ReIDModel, build_model
from strongreid.modeling.checkpoint import LoadReport, read_weights_file
from strongreid.modeling.heads import HEADS, GeM, GlobalAvgPool, build_pooling
from strongreid.modeling.weights import (
    load_backbone_file,
    load_published_weights,
    load_test_weights,
)

__all__ = [
    "BACKBONES",
    "HEADS",
    "GeM",
    "GlobalAvgPool",
    "LoadReport",
    "ReIDModel",
    "build_model",
    "build_pooling",
    "create_backbone",
    "load_backbone_file",
    "load_published_weights",
    "load_test_weights",
    "read_weights_file",
]
