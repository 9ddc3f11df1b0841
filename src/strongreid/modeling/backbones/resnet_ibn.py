"""ResNet-IBN-a and -b (Pan et al., ECCV 2018); IBN-a is the strongest backbone of the original's table.

IBN-a: every bottleneck of layer1-3 normalises the output of its first 1x1 conv with IBN: instance
norm on the first half of the channels, batch norm on the rest. layer4 is a plain ResNet stage.
IBN-b: the stem normalises with an (affine) instance norm, and the last block of layer1 and of
layer2 applies one (`IN`) to its output after the residual sum, before the ReLU; the rest is a
plain ResNet. The names (`bn1.IN`, `bn1.BN`; `bn1`, `layer1.2.IN` for IBN-b) match IBN-Net's
released files, torchreid's resnet50_ibn_a / resnet50_ibn_b and the original project's weights.
Unlike the original we build no unused 2048x1000 `fc`: nothing reads it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from strongreid.modeling.backbones.base import BACKBONES, apply_last_stride, out_channels

IBN_A_URLS = {
    50: "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/resnet50_ibn_a-d9d0bb7b.pth",
    101: "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/resnet101_ibn_a-59ea0ac6.pth",
}
IBN_B_URLS = {
    50: "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/resnet50_ibn_b-9ca61e85.pth",
    101: "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/resnet101_ibn_b-c55f6dba.pth",
}


class IBN(nn.Module):
    """InstanceNorm on the first floor(planes * ratio) channels, BatchNorm on the others."""

    def __init__(self, planes: int, ratio: float = 0.5) -> None:
        super().__init__()
        self.half = int(planes * ratio)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat((self.IN(a.contiguous()), self.BN(b.contiguous())), dim=1)


class BottleneckIBN(nn.Module):
    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, ibn: bool, stride: int = 1,
        downsample: nn.Module | None = None, in_after: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = IBN(planes) if ibn else nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        if in_after:  # IBN-b: instance norm of the block's output
            self.IN = nn.InstanceNorm2d(planes * self.expansion, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out)) + identity
        if hasattr(self, "IN"):
            out = self.IN(out)
        return self.relu(out)


class ResNetIBNa(nn.Module):
    """ResNet-IBN-a feature extractor: stem (with ReLU) and four stages, no pooling or fc.

    `variant` 'b' builds ResNet-IBN-b instead (instance-norm stem, IN after layer1/2's last block).
    """

    def __init__(self, layers: tuple[int, int, int, int], last_stride: int, variant: str = "a") -> None:
        super().__init__()
        self.inplanes = 64
        self.variant = variant
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.InstanceNorm2d(64, affine=True) if variant == "b" else nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], stride=1, ibn=True)
        self.layer2 = self._make_layer(128, layers[1], stride=2, ibn=True)
        self.layer3 = self._make_layer(256, layers[2], stride=2, ibn=variant == "a")
        self.layer4 = self._make_layer(512, layers[3], stride=2, ibn=False)
        apply_last_stride(self.layer4, last_stride)
        self.feat_dim = out_channels(self.layer4)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int, ibn: bool) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BottleneckIBN.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BottleneckIBN.expansion, kernel_size=1,
                          stride=stride, bias=False),
                nn.BatchNorm2d(planes * BottleneckIBN.expansion),
            )
        # IBN-a puts IBN into every block's bn1; IBN-b an IN after the stage's last block.
        a, b = ibn and self.variant == "a", ibn and self.variant == "b"
        layers = [BottleneckIBN(self.inplanes, planes, a, stride, downsample, in_after=b and blocks == 1)]
        self.inplanes = planes * BottleneckIBN.expansion
        layers += [BottleneckIBN(self.inplanes, planes, a, in_after=b and i == blocks - 1) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # IBN-Net's own initialisation: N(0, sqrt(2 / (k*k*out))) convs, unit-scale norms.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


@BACKBONES.register("resnet50_ibn_a")
def resnet50_ibn_a(last_stride: int) -> nn.Module:
    net = ResNetIBNa((3, 4, 6, 3), last_stride)
    net.weights_source = ("url", IBN_A_URLS[50])
    return net


@BACKBONES.register("resnet101_ibn_a")
def resnet101_ibn_a(last_stride: int) -> nn.Module:
    net = ResNetIBNa((3, 4, 23, 3), last_stride)
    net.weights_source = ("url", IBN_A_URLS[101])
    return net


@BACKBONES.register("resnet50_ibn_b")
def resnet50_ibn_b(last_stride: int) -> nn.Module:
    net = ResNetIBNa((3, 4, 6, 3), last_stride, variant="b")
    net.weights_source = ("url", IBN_B_URLS[50])
    return net


@BACKBONES.register("resnet101_ibn_b")
def resnet101_ibn_b(last_stride: int) -> nn.Module:
    net = ResNetIBNa((3, 4, 23, 3), last_stride, variant="b")
    net.weights_source = ("url", IBN_B_URLS[101])
    return net
