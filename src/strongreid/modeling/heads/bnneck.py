"""BNNeck and the classifier initialisation of the strong baseline's head."""

from __future__ import annotations

import torch.nn as nn


def weights_init_kaiming(m: nn.Module) -> None:
    """The original's Kaiming helper: fan-out Linear, fan-in Conv, unit-scale zero-shift norms."""
    if isinstance(m, nn.Linear):
        nn.init.kaiming_normal_(m.weight, a=0, mode="fan_out")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def weights_init_classifier(m: nn.Module) -> None:
    """N(0, 0.001^2) weights, zero bias (when there is one)."""
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.001)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def make_bnneck(feat_dim: int) -> nn.BatchNorm1d:
    """BatchNorm1d with its shift frozen at 0: BNNeck normalises without moving the features."""
    bn = nn.BatchNorm1d(feat_dim)
    bn.bias.requires_grad_(False)
    bn.apply(weights_init_kaiming)
    return bn
