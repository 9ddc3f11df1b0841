"""fast-reid's ResNet (build_resnet_backbone): the backbone of its BoT, AGW and SBS model zoo.

It is torchvision's ResNet (or ResNet-IBN-a) with two differences that change the features, so
loading fast-reid weights into our `resnet50` would run but compute something else:

* the stem max-pool has no padding and rounds up (`MaxPool2d(3, 2, ceil_mode=True)`): the same
  map size as torchvision's padded pool, sampled one pixel further on;
* WITH_NL adds non-local blocks (`NL_1`..`NL_4`, ModuleLists) after the last blocks of stages 2
  and 3 (2 and 3 of them for R50, 2 and 9 for R101), as AGW (Ye et al., TPAMI 2021) does. The
  block is modeling/non_local.py's, the one MODEL.NON_LOCAL attaches to any ResNet.

Parameter names are fast-reid's own (`conv1`, `layer1.0.bn1.IN`, `NL_2.0.W.1.running_var`...),
so a fast-reid `backbone.*` state dict loads by name. Names: `fastreid_resnet{50,101}` with
`_ibn` and/or `_nl` (e.g. `fastreid_resnet50_ibn_nl`, the SBS(R50-ibn) backbone).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from strongreid.modeling.backbones.base import BACKBONES
from strongreid.modeling.backbones.resnet import ResNetBackbone
from strongreid.modeling.backbones.resnet_ibn import IBN_A_URLS, ResNetIBNa
from strongreid.modeling.non_local import NonLocal

# Blocks per stage and non-local blocks per stage (fast-reid's nl_layers_per_stage).
LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
NL_PER_STAGE = {50: (0, 2, 3, 0), 101: (0, 2, 9, 0)}


class FastReIDResNet(nn.Module):
    """fast-reid's ResNet-50/101 (optionally IBN-a, optionally with non-local blocks)."""

    def __init__(self, depth: int, last_stride: int, ibn: bool = False, nl: bool = False) -> None:
        super().__init__()
        net = ResNetIBNa(LAYERS[depth], last_stride) if ibn else ResNetBackbone(depth, last_stride)
        self.conv1, self.bn1, self.relu = net.conv1, net.bn1, net.relu
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.feat_dim = net.feat_dim
        self.weights_source = ("url", IBN_A_URLS[depth]) if ibn else ("torchvision", f"resnet{depth}")
        self.nl_index: list[list[int]] = [[], [], [], []]
        if nl:
            for k, (layer, count) in enumerate(zip(self._stages(), NL_PER_STAGE[depth])):
                width = layer[-1].conv3.out_channels
                setattr(self, f"NL_{k + 1}", nn.ModuleList(NonLocal(width) for _ in range(count)))
                # After the last `count` blocks of the stage, in order.
                self.nl_index[k] = sorted(len(layer) - 1 - i for i in range(count))

    def _stages(self) -> tuple[nn.Sequential, ...]:
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for k, layer in enumerate(self._stages()):
            blocks = getattr(self, f"NL_{k + 1}", None)
            for i, block in enumerate(layer):
                x = block(x)
                if i in self.nl_index[k]:
                    x = blocks[self.nl_index[k].index(i)](x)
        return x


def _register(depth: int, ibn: bool, nl: bool) -> None:
    name = f"fastreid_resnet{depth}" + ("_ibn" if ibn else "") + ("_nl" if nl else "")

    def factory(last_stride: int) -> nn.Module:
        return FastReIDResNet(depth, last_stride, ibn=ibn, nl=nl)

    factory.__name__ = name
    BACKBONES.register(name)(factory)


for _depth in LAYERS:
    for _ibn in (False, True):
        for _nl in (False, True):
            _register(_depth, _ibn, _nl)
