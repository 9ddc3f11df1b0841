"""Initialisation options beyond the original's: classifier std, zero-init residual BN.

Both leave the model untouched at their defaults (MODEL.CLASSIFIER_INIT_STD 0.001,
MODEL.ZERO_INIT_RESIDUAL False), so the original configs build bit-identical weights.
"""

from __future__ import annotations

import torch.nn as nn
from yacs.config import CfgNode

from strongreid.config.components import check_choices, config_check
from strongreid.errors import ConfigError

ORIGINAL_CLASSIFIER_STD = 0.001


def last_block_norms(backbone: nn.Module) -> list[nn.BatchNorm2d]:
    """The BN closing each residual block's main branch: bn3 of a bottleneck, bn2 of a basic
    block (torchvision's, our IBN blocks' and timm's ResNets name them so)."""
    norms = []
    for module in backbone.modules():
        if not hasattr(module, "downsample") or not hasattr(module, "conv2"):
            continue  # not a residual block
        bn = getattr(module, "bn3", None) if hasattr(module, "conv3") else getattr(module, "bn2", None)
        if isinstance(bn, nn.BatchNorm2d) and bn.affine:
            norms.append(bn)
    return norms


def zero_init_residual(backbone: nn.Module, arch: str) -> int:
    """Zero the scale of every block's last BN, so each block starts as the identity (Goyal et
    al. 2017); returns how many were zeroed. A backbone without ResNet blocks is an error."""
    norms = last_block_norms(backbone)
    if not norms:
        raise ConfigError(
            f"MODEL.ZERO_INIT_RESIDUAL True: backbone {arch!r} has no ResNet-style residual blocks "
            "(modules with downsample, conv2 and bn2/bn3); set MODEL.ZERO_INIT_RESIDUAL False."
        )
    for bn in norms:
        nn.init.zeros_(bn.weight)
    return len(norms)


def apply_init_options(cfg: CfgNode, model: nn.Module) -> None:
    """Re-initialise what MODEL.CLASSIFIER_INIT_STD / ZERO_INIT_RESIDUAL ask for (before any
    pretrained weights are loaded, which then take precedence)."""
    std = float(cfg.MODEL.CLASSIFIER_INIT_STD)
    if std != ORIGINAL_CLASSIFIER_STD and getattr(model, "bottleneck", None) is not None:
        # Only the BNNeck's bias-free classifier has the N(0, std^2) init; neck 'no' keeps
        # nn.Linear's default, as the original does.
        nn.init.normal_(model.classifier.weight, std=std)
    if cfg.MODEL.ZERO_INIT_RESIDUAL:
        zero_init_residual(model.backbone, cfg.MODEL.NAME)


@config_check("initialisation")
def check_init_keys(cfg: CfgNode) -> None:
    """MODEL.PRETRAIN_CHOICE / PRETRAIN_PATH and MODEL.CLASSIFIER_INIT_STD."""
    check_choices(cfg, {"MODEL.PRETRAIN_CHOICE": ("imagenet", "self", "none")})
    if cfg.MODEL.CLASSIFIER_INIT_STD <= 0:
        raise ConfigError(
            f"MODEL.CLASSIFIER_INIT_STD = {cfg.MODEL.CLASSIFIER_INIT_STD} must be positive "
            "(0.001 the original, 0.01 fast-reid)."
        )
    if cfg.MODEL.PRETRAIN_CHOICE == "self" and not cfg.MODEL.PRETRAIN_PATH:
        raise ConfigError("MODEL.PRETRAIN_CHOICE 'self' needs MODEL.PRETRAIN_PATH (a strongreid checkpoint).")
