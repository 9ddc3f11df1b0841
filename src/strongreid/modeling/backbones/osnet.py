"""OSNet (Zhou et al., ICCV 2019) and its IBN / AIN variants (Zhou et al., TPAMI 2021).

An omni-scale block runs four streams of 1, 2, 3 and 4 lightweight 3x3 convolutions (a 1x1 conv
then a depthwise 3x3) on a reduced-width input, and sums them weighted by one shared channel gate
(the "unified aggregation gate"), so each block mixes receptive fields of 3 to 9 pixels.

Module and parameter names follow torchreid's implementation (`conv1`, `conv2.0.conv2b.1.conv1`,
`gate.fc1`, `pool2.0.conv` ...) so that torchreid's ImageNet and model-zoo files load by name. The
two families differ in layout, and so do their files: plain OSNet (and OSNet-IBN) names the four
streams `conv2a`..`conv2d` and puts each transition (1x1 conv + 2x2 average pool) inside its stage
(`conv2.2`), OSNet-AIN keeps the streams in a list (`conv2.0..3.layers`) and the transitions apart
(`pool2`, `pool3`). torchreid's `fc` (Linear-BN-ReLU to 512) and classifier are head parts, not
part of this backbone: any strongreid head goes on top of `conv5`.

LAST_STRIDE follows the contract of every backbone here, 16x8 maps at 256x128 with 1 and 8x4
with 2. OSNet's last stage (conv4, conv5) already runs at the resolution of the stage before it,
as a ResNet's layer4 does with last stride 1, so 1 is the published network (output stride 16);
2 downsamples the input of conv4 by a 2x2 average pool, as OSNet's own transitions do (output
stride 32, the analogue of ResNet's standard stride). No parameter depends on it: files load
either way, and torchreid's features are those of LAST_STRIDE 1.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from strongreid.modeling.backbones.base import BACKBONES, check_last_stride

TORCHREID_ZOO = "https://kaiyangzhou.github.io/deep-person-reid/MODEL_ZOO"

# Stage widths (stem, conv2, conv3, conv4) of the four published sizes.
WIDTHS: dict[str, tuple[int, int, int, int]] = {
    "x1_0": (64, 256, 384, 512),
    "x0_75": (48, 192, 288, 384),
    "x0_5": (32, 128, 192, 256),
    "x0_25": (16, 64, 96, 128),
}


class ConvBNReLU(nn.Module):
    """conv -> BatchNorm (or affine InstanceNorm) -> ReLU; torchreid's ConvLayer / Conv1x1."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0,
        instance_norm: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.InstanceNorm2d(cout, affine=True) if instance_norm else nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Conv1x1Linear(nn.Module):
    """1x1 conv, optionally followed by BN, no activation (projections and shortcuts)."""

    def __init__(self, cin: int, cout: int, bn: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        # torchreid stores None (no keys) when the block normalises with IN instead.
        self.bn = nn.BatchNorm2d(cout) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x if self.bn is None else self.bn(x)


class LightConv3x3(nn.Module):
    """1x1 conv (linear) then depthwise 3x3 conv, BN, ReLU: the paper's Lite 3x3 layer."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False, groups=cout)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv2(self.conv1(x))))


class LightConvStream(nn.Module):
    """`depth` Lite 3x3 layers in a row (OSNet-AIN's name for one stream)."""

    def __init__(self, channels: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(LightConv3x3(channels, channels) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ChannelGate(nn.Module):
    """Squeeze-excitation style gate: GAP -> 1x1 (C/16) -> ReLU -> 1x1 (C) -> sigmoid, times x."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=True)
        self.gate_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate_activation(self.fc2(self.relu(self.fc1(self.global_avgpool(x)))))
        return x * w


class OSBlock(nn.Module):
    """Plain OSNet's block: streams `conv2a`..`conv2d`; IBN puts an IN after the residual sum."""

    def __init__(self, cin: int, cout: int, instance_norm: bool = False) -> None:
        super().__init__()
        mid = cout // 4
        self.conv1 = ConvBNReLU(cin, mid)
        self.conv2a = LightConv3x3(mid, mid)
        self.conv2b = nn.Sequential(*(LightConv3x3(mid, mid) for _ in range(2)))
        self.conv2c = nn.Sequential(*(LightConv3x3(mid, mid) for _ in range(3)))
        self.conv2d = nn.Sequential(*(LightConv3x3(mid, mid) for _ in range(4)))
        self.gate = ChannelGate(mid)
        self.conv3 = Conv1x1Linear(mid, cout)
        self.downsample = Conv1x1Linear(cin, cout) if cin != cout else None
        self.IN = nn.InstanceNorm2d(cout, affine=True) if instance_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv1(x)
        # One gate shared by all four streams: that is what makes the aggregation "unified".
        x2 = sum(self.gate(stream(x1)) for stream in (self.conv2a, self.conv2b, self.conv2c,
                                                      self.conv2d))
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv3(x2) + identity
        if self.IN is not None:
            out = self.IN(out)
        return F.relu(out)


class OSBlockAIN(nn.Module):
    """OSNet-AIN's block: streams in `conv2`; with `instance_norm` IN replaces conv3's BN (INin)."""

    def __init__(self, cin: int, cout: int, instance_norm: bool = False) -> None:
        super().__init__()
        mid = cout // 4
        self.conv1 = ConvBNReLU(cin, mid)
        self.conv2 = nn.ModuleList(LightConvStream(mid, depth) for depth in range(1, 5))
        self.gate = ChannelGate(mid)
        self.conv3 = Conv1x1Linear(mid, cout, bn=not instance_norm)
        self.downsample = Conv1x1Linear(cin, cout) if cin != cout else None
        self.IN = nn.InstanceNorm2d(cout, affine=True) if instance_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv1(x)
        x2 = sum(self.gate(stream(x1)) for stream in self.conv2)
        x3 = self.conv3(x2)
        if self.IN is not None:
            x3 = self.IN(x3)  # inside the residual branch, unlike IBN
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(x3 + identity)


def _transition(channels: int) -> nn.Sequential:
    """1x1 conv + 2x2 average pool between stages (no strided convs anywhere in OSNet)."""
    return nn.Sequential(ConvBNReLU(channels, channels), nn.AvgPool2d(2, stride=2))


# Which blocks of OSNet-AIN normalise with IN (published: conv2 both, conv3 second, conv4 first).
AIN_PATTERN = ((True, True), (False, True), (True, False))


class OSNet(nn.Module):
    """OSNet feature extractor up to `conv5` (B x C x H/16 x W/16 at last stride 1).

    `variant`: 'plain', 'ibn' (IN in the stem and after conv2's blocks) or 'ain' (IN in the stem
    and inside the residual of the blocks AIN_PATTERN names).
    """

    def __init__(
        self, widths: tuple[int, int, int, int], last_stride: int, variant: str = "plain"
    ) -> None:
        super().__init__()
        if variant not in ("plain", "ibn", "ain"):
            raise ValueError(f"OSNet variant {variant!r}: use 'plain', 'ibn' or 'ain'")
        c0, c1, c2, c3 = widths
        self.variant = variant
        self.conv1 = ConvBNReLU(3, c0, 7, stride=2, padding=3, instance_norm=variant != "plain")
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        if variant == "ain":
            pattern = AIN_PATTERN
            self.conv2 = self._ain_stage(c0, c1, pattern[0])
            self.pool2 = _transition(c1)
            self.conv3 = self._ain_stage(c1, c2, pattern[1])
            self.pool3 = _transition(c2)
            self.conv4 = self._ain_stage(c2, c3, pattern[2])
        else:
            ibn = variant == "ibn"
            self.conv2 = nn.Sequential(OSBlock(c0, c1, ibn), OSBlock(c1, c1, ibn), _transition(c1))
            self.conv3 = nn.Sequential(OSBlock(c1, c2), OSBlock(c2, c2), _transition(c2))
            self.conv4 = nn.Sequential(OSBlock(c2, c3), OSBlock(c3, c3))
        self.conv5 = ConvBNReLU(c3, c3)
        check_last_stride(last_stride)
        # Parameter-free, so not inside conv4 (that would renumber torchreid's conv4.<i> keys).
        self.last_pool = nn.AvgPool2d(2, stride=2) if last_stride == 2 else nn.Identity()
        self.feat_dim = c3
        self._init_weights()

    @staticmethod
    def _ain_stage(cin: int, cout: int, instance_norm: tuple[bool, ...]) -> nn.Sequential:
        widths_in = [cin] + [cout] * (len(instance_norm) - 1)
        return nn.Sequential(*(OSBlockAIN(w, cout, n) for w, n in zip(widths_in, instance_norm)))

    def _init_weights(self) -> None:
        # torchreid's initialisation: Kaiming fan-out convs, unit-scale zero-shift norms.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv2(x)
        if self.variant == "ain":
            x = self.pool2(x)
        x = self.conv3(x)
        if self.variant == "ain":
            x = self.pool3(x)
        return self.conv5(self.conv4(self.last_pool(x)))


def _register(name: str, width: str, variant: str) -> None:
    def factory(last_stride: int) -> nn.Module:
        net = OSNet(WIDTHS[width], last_stride, variant)
        # torchreid publishes ImageNet weights on Google Drive only (gdown), which no plain
        # HTTP client can fetch: the user downloads `<name>_imagenet.pth` and sets PRETRAIN_PATH.
        net.weights_source = ("manual", f"{name}_imagenet.pth from {TORCHREID_ZOO}")
        return net

    factory.__name__ = name
    BACKBONES.register(name)(factory)


for _width in WIDTHS:
    _register(f"osnet_{_width}", _width, "plain")
    _register(f"osnet_ain_{_width}", _width, "ain")
_register("osnet_ibn_x1_0", "x1_0", "ibn")
