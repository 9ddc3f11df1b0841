"""torchvision ResNet-18/34/50/101/152 as feature-map backbones.

We keep torchvision's module names (conv1, bn1, layer1...) so its ImageNet files and the original
project's `base.*` weights load by name. Unlike reid-strong-baseline we keep the stem ReLU: its
removal there is a bug (issues #4, #117), the ImageNet weights were trained with it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from strongreid.modeling.backbones.base import BACKBONES, apply_last_stride, out_channels


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its pooling and fc, layer4's stride set to `last_stride`."""

    def __init__(self, depth: int, last_stride: int) -> None:
        super().__init__()
        net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        apply_last_stride(self.layer4, last_stride)
        self.feat_dim = out_channels(self.layer4)
        self.weights_source = ("torchvision", f"resnet{depth}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


DEPTHS = (18, 34, 50, 101, 152)


def register_resnets(cls: type[ResNetBackbone], prefix: str) -> None:
    """Register `{prefix}{depth}` for every torchvision depth, built as `cls(depth, last_stride)`."""
    for depth in DEPTHS:
        def factory(last_stride: int, depth: int = depth) -> nn.Module:
            return cls(depth, last_stride)

        factory.__name__ = f"{prefix}{depth}"
        BACKBONES.register(f"{prefix}{depth}")(factory)


register_resnets(ResNetBackbone, "resnet")
