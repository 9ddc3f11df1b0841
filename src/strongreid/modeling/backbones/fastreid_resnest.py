"""fast-reid's ResNeSt (build_resnest_backbone): the backbone of its `*_S50` model zoo.

ResNeSt (Zhang et al., "ResNeSt: Split-Attention Networks", 2020) is a ResNet-D whose 3x3 convs
are split-attention convs. fast-reid builds it with radix 2, cardinality 1, bottleneck width 64,
a deep stem (three 3x3 convs, width 32 for S50 and 64 for the deeper ones), average-pool
downsampling in the shortcuts (`avg_down`) and the strided 3x3 replaced by a 3x3 average pool
after the split-attention conv (`avd`, not `avd_first`). Details that change the features and are
kept as fast-reid has them:

* LAST_STRIDE 1 is not "stride 1 in layer4": fast-reid then builds layer4 with dilation 2 (its
  first block undilated, the others with dilation 2 and padding 2), and the first block's `avd`
  pool stays, as a stride-1 3x3 average (a blur) after its split-attention conv;
* the shortcut pools are `AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)`,
  a 1x1 identity pool where the stage does not downsample;
* the split-attention's reduction width is max(in * radix / 4, 32), with biased 1x1 convs.

Parameter names are fast-reid's (`conv1.0`, `layer1.0.conv2.fc1`, `layer2.0.downsample.1`...),
which are also those of the ResNeSt project's ImageNet files. Names: `fastreid_resnest50`,
`fastreid_resnest101`, `fastreid_resnest200`, `fastreid_resnest269` (fast-reid's DEPTH 50x...).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from strongreid.modeling.backbones.base import BACKBONES, check_last_stride
from strongreid.modeling.backbones.resnet import ResNetBackbone

# fast-reid's tables: blocks per stage and stem width per depth.
LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 200: (3, 24, 36, 3), 269: (3, 30, 48, 8)}
STEM_WIDTH = {50: 32, 101: 64, 200: 64, 269: 64}
_HASHES = {50: "528c19ca", 101: "22405ba7", 200: "75117900", 269: "0cc87c48"}
URLS = {d: f"https://github.com/zhanghang1989/ResNeSt/releases/download/weights_step1/resnest{d}-{h}.pth"
        for d, h in _HASHES.items()}
RADIX = 2


class SplitAttentionConv(nn.Module):
    """Split-attention 3x3 conv (radix R, one cardinal group): R grouped convs, their sum pooled
    into a 1x1 bottleneck MLP that weighs the R splits by a softmax across them."""

    def __init__(self, channels: int, stride: int = 1, dilation: int = 1, radix: int = RADIX) -> None:
        super().__init__()
        inter = max(channels * radix // 4, 32)
        self.radix = radix
        self.conv = nn.Conv2d(channels, channels * radix, 3, stride, padding=dilation,
                              dilation=dilation, groups=radix, bias=False)
        self.bn0 = nn.BatchNorm2d(channels * radix)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, inter, 1)
        self.bn1 = nn.BatchNorm2d(inter)
        self.fc2 = nn.Conv2d(inter, channels * radix, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.conv(x)))
        batch, width = x.shape[0], x.shape[1] // self.radix
        splits = torch.split(x, width, dim=1)
        gap = F.adaptive_avg_pool2d(sum(splits), 1)
        atten = self.fc2(self.relu(self.bn1(self.fc1(gap))))
        # Softmax across the radix for every channel (rSoftMax with cardinality 1).
        atten = F.softmax(atten.view(batch, self.radix, width), dim=1).reshape(batch, -1, 1, 1)
        return sum(a * s for a, s in zip(torch.split(atten, width, dim=1), splits))


class ResNeStBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, avd: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = SplitAttentionConv(planes, stride=1 if avd else stride, dilation=dilation)
        # fast-reid's avd: the stride moves to a 3x3 average pool after the split-attention conv
        # (kept at stride 1 too, where the block is the first of its stage).
        self.avd_layer = nn.AvgPool2d(3, stride, padding=1) if avd else None
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.relu(self.bn1(self.conv1(x))))
        if self.avd_layer is not None:
            out = self.avd_layer(out)
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class FastReIDResNeSt(nn.Module):
    """fast-reid's ResNeSt-50/101/200/269 feature extractor (stem and four stages, no pooling)."""

    def __init__(self, depth: int, last_stride: int) -> None:
        super().__init__()
        check_last_stride(last_stride)
        stem = STEM_WIDTH[depth]
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
            nn.Conv2d(stem, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
            nn.Conv2d(stem, stem * 2, 3, 1, 1, bias=False),
        )
        self.inplanes = stem * 2
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        blocks = LAYERS[depth]
        self.layer1 = self._make_layer(64, blocks[0], 1, 1, is_first=False)
        self.layer2 = self._make_layer(128, blocks[1], 2, 1)
        self.layer3 = self._make_layer(256, blocks[2], 2, 1)
        # Last stride 1 is fast-reid's "dilation 2" layout (see the module docstring).
        self.layer4 = self._make_layer(512, blocks[3], last_stride, 2 if last_stride == 1 else 1)
        self.feat_dim = 512 * ResNeStBottleneck.expansion
        self.weights_source = ("url", URLS[depth])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # ResNeSt's init: N(0, sqrt(2 / (k*k*out)))
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))

    def _make_layer(self, planes: int, blocks: int, stride: int, dilation: int,
                    is_first: bool = True) -> nn.Sequential:
        width = planes * ResNeStBottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != width:
            pool = stride if dilation == 1 else 1
            downsample = nn.Sequential(
                nn.AvgPool2d(pool, pool, ceil_mode=True, count_include_pad=False),
                nn.Conv2d(self.inplanes, width, 1, bias=False),
                nn.BatchNorm2d(width),
            )
        layers = [ResNeStBottleneck(self.inplanes, planes, stride, 1, downsample,
                                    avd=stride > 1 or is_first)]
        self.inplanes = width
        layers += [ResNeStBottleneck(width, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    # The stem (its conv1 a Sequential here), then layer1..layer4: a torchvision ResNet's forward.
    forward = ResNetBackbone.forward


def _register(depth: int) -> None:
    name = f"fastreid_resnest{depth}"

    def factory(last_stride: int) -> nn.Module:
        return FastReIDResNeSt(depth, last_stride)

    factory.__name__ = name
    BACKBONES.register(name)(factory)


for _depth in LAYERS:
    _register(_depth)
