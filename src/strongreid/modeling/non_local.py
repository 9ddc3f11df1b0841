"""Non-local blocks (Wang et al. 2018) in a ResNet, as AGW / fast-reid place them (MODEL.NON_LOCAL).

fast-reid (layers/non_local.py, backbones/resnet.py) adds `Non_local(C)` after the last n blocks
of each stage, n = [0, 2, 3, 0] for ResNet-50: after layer2's last two and layer3's last three
blocks. Its embedded-Gaussian-free ("dot product") form: theta, phi, g are 1x1 convs to
`inter` channels, y = (theta^T phi / N) g, z = x + BN(W y) with the BN zero-initialised, so a new
block starts as the identity. fast-reid's `inter_channels = reduc_ratio // reduc_ratio` is 1;
MODEL.NL_INTER_CHANNELS keeps that default (its published AGW numbers) and takes C/2 (the
Non-local paper's) as `0`.

Each block is attached to the ResNet block it follows as `<layerK>.<i>.non_local` and applied by a
forward hook, so the ResNet's own parameter names (ImageNet files) do not change. fast-reid's
`backbone.NL_2.0.*` is our `backbone.layer2.<n-2>.non_local.*` (docs/coming-from-layumi.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from yacs.config import CfgNode

from strongreid.config.components import config_check
from strongreid.errors import ConfigError


class NonLocal(nn.Module):
    """z = x + BN(W((theta(x)^T phi(x) / N) g(x))), the BN's scale and shift starting at 0."""

    def __init__(self, in_channels: int, inter_channels: int = 1) -> None:
        super().__init__()
        inter = inter_channels if inter_channels > 0 else max(1, in_channels // 2)
        self.inter_channels = inter
        self.g = nn.Conv2d(in_channels, inter, kernel_size=1)
        self.theta = nn.Conv2d(in_channels, inter, kernel_size=1)
        self.phi = nn.Conv2d(in_channels, inter, kernel_size=1)
        self.W = nn.Sequential(nn.Conv2d(inter, in_channels, kernel_size=1), nn.BatchNorm2d(in_channels))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        g = self.g(x).flatten(2).transpose(1, 2)  # B x N x I
        theta = self.theta(x).flatten(2).transpose(1, 2)  # B x N x I
        phi = self.phi(x).flatten(2)  # B x I x N
        f = torch.matmul(theta, phi) / (h * w)
        y = torch.matmul(f, g).transpose(1, 2).reshape(b, self.inter_channels, h, w)
        return x + self.W(y)


def _apply_non_local(block: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    # A module-level function (not a closure) so that deep copies (weight averaging) use their
    # own non_local module.
    return block.non_local(output)


def add_non_local(backbone: nn.Module, per_stage: list[int] | tuple[int, ...],
                  inter_channels: int = 1) -> int:
    """Attach NonLocal blocks after the last per_stage[k] blocks of layer{k+1}; return how many."""
    stages = [getattr(backbone, f"layer{k}", None) for k in range(1, 5)]
    if any(not isinstance(s, nn.Sequential) for s in stages):
        raise ConfigError(
            f"MODEL.NON_LOCAL needs a ResNet-style backbone with layer1..layer4 (resnet*, "
            f"resnet50_ibn_a...); {getattr(backbone, 'arch', type(backbone).__name__)} has none."
        )
    if len(per_stage) != 4 or any(n < 0 for n in per_stage):
        raise ConfigError(f"MODEL.NL_LAYERS = {list(per_stage)}: give 4 counts >= 0 (AGW: [0, 2, 3, 0]).")
    added = 0
    for stage, n in zip(stages, per_stage):
        if n > len(stage):
            raise ConfigError(
                f"MODEL.NL_LAYERS = {list(per_stage)}: a stage of this backbone has only {len(stage)} "
                f"blocks, fewer than {n}."
            )
        for block in list(stage)[len(stage) - n:]:
            block.non_local = NonLocal(_out_channels(block), inter_channels)
            block.register_forward_hook(_apply_non_local)
            added += 1
    return added


def _out_channels(block: nn.Module) -> int:
    # The last BN of a ResNet block (bn3 / bn2, or the shortcut's) has the output's width.
    bns = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    return int(bns[-1].num_features)


@config_check("non_local")
def check_non_local_keys(cfg: CfgNode) -> None:
    """MODEL.NL_LAYERS: four block counts; MODEL.NL_INTER_CHANNELS a width >= 0."""
    m = cfg.MODEL
    if len(m.NL_LAYERS) != 4 or any(int(n) < 0 for n in m.NL_LAYERS) or m.NL_INTER_CHANNELS < 0:
        raise ConfigError(
            f"MODEL.NL_LAYERS = {list(m.NL_LAYERS)} / NL_INTER_CHANNELS = {m.NL_INTER_CHANNELS}: give "
            "4 block counts >= 0 (AGW: [0, 2, 3, 0]) and a width >= 0."
        )
