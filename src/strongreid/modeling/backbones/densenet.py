"""DenseNet-121 as layumi's ft_net_dense uses it: torchvision's `features` (conv0 ... norm5).

layumi pools `model.features(x)` directly, so unlike torchvision's classifier there is no ReLU
after norm5; module names are torchvision's, so layumi's `model.features.*` tensors load by name.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from strongreid.modeling.backbones.base import BACKBONES, check_last_stride


class LayumiDenseNet121(nn.Module):
    """torchvision DenseNet-121 features; LAST_STRIDE 1 sets transition3's pool stride to 1,
    as layumi's `--stride 1` does (a 2x2 average pool at stride 1: one row and column fewer)."""

    def __init__(self, last_stride: int) -> None:
        super().__init__()
        net = torchvision.models.densenet121(weights=None)
        self.features = net.features
        if check_last_stride(last_stride) == 1:
            self.features.transition3.pool.stride = 1
        self.feat_dim = int(net.classifier.in_features)
        self.arch = "layumi_densenet121"
        self.weights_source = ("torchvision", "densenet121")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@BACKBONES.register("layumi_densenet121")
def layumi_densenet121(last_stride: int) -> nn.Module:
    return LayumiDenseNet121(last_stride)
