"""The backbone registry and the last-stride surgery shared by every family of backbones."""

from __future__ import annotations

import logging

import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from strongreid.config.components import config_check, selects
from strongreid.config.loader import timm_kwargs
from strongreid.errors import ConfigError, StrongReIDError
from strongreid.registry import Registry

logger = logging.getLogger(__name__)

# name -> factory(last_stride) returning a module whose forward gives a B x C x H x W map and
# which exposes `feat_dim` (C), `arch` (the name) and `weights_source` (where published weights
# come from: ("torchvision", name) | ("url", url) | ("timm", name) | ("manual", where to get them)).
BACKBONES: Registry = Registry("backbone")
# prefix -> factory(model_name, last_stride, kwargs, img_size) for whole families named by prefix
# ('timm:<name>' is any timm model); MODEL.TIMM_KWARGS go to the family's factory.
BACKBONE_FAMILIES: Registry = Registry("backbone family")

TIMM_PREFIX = "timm:"


def family_of(name: str) -> str | None:
    """The registered prefix `name` starts with, if any."""
    return next((p for p in BACKBONE_FAMILIES.names_in_order() if name.startswith(p)), None)


selects("MODEL.NAME", BACKBONES, accepts=lambda name: family_of(name) is not None,
        unknown=lambda name: f"MODEL.NAME = {name!r} is not a known backbone",
        hint=", or any timm model as 'timm:<name>'")


@config_check("backbone")
def check_backbone_keys(cfg: CfgNode) -> None:
    """MODEL.TIMM_KWARGS parses and goes with a prefixed (timm) backbone only."""
    timm_kwargs(cfg)
    if cfg.MODEL.TIMM_KWARGS.strip() and family_of(cfg.MODEL.NAME) is None:
        raise ConfigError(
            f"MODEL.TIMM_KWARGS applies to timm backbones ('timm:<name>'), not to MODEL.NAME "
            f"{cfg.MODEL.NAME!r}; clear it or name the timm model."
        )


def check_last_stride(last_stride: int) -> int:
    if last_stride not in (1, 2):
        raise ConfigError(
            f"MODEL.LAST_STRIDE = {last_stride!r}: use 1 (the strong baseline, 16x8 maps at "
            "256x128) or 2 (the standard ResNet stride, 8x4)."
        )
    return int(last_stride)


def apply_last_stride(stage: nn.Module, last_stride: int, names: set[str] | None = None) -> int:
    """Give every strided conv/pool of the final stage stride `last_stride`; return how many.

    In ResNet-like stages only the first block downsamples (its strided conv and its shortcut),
    in ConvNeXt the stage's leading downsample conv, so rewriting every strided layer of the stage
    is exactly "the stride of the last downsampling" for all of them.
    """
    check_last_stride(last_stride)
    changed = 0
    # Collect first: replacing pools while iterating named_modules would skip entries.
    for name, module in list(stage.named_modules()):
        if names is not None and name not in names:
            continue  # only the given submodules (the layers between two stages, see timm_models)
        if isinstance(module, nn.Conv2d) and max(module.stride) > 1:
            module.stride = (last_stride, last_stride)
            if last_stride == 1 and any(
                2 * p != d * (k - 1)
                for p, k, d in zip(module.padding, module.kernel_size, module.dilation)
            ):
                # An unpadded even kernel (ConvNeXt's 2x2 patch conv) would shrink the map by one
                # pixel at stride 1; padding its input keeps the 16x8 geometry of the paper. A
                # hook rather than a wrapper module, so that parameter names (and files) still fit.
                module.register_forward_pre_hook(SamePad(module))
            changed += 1
        elif isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)) and _pool_stride(module) > 1:
            if last_stride == 1:
                # A strided average pool in a shortcut ("ResNet-D") has nothing left to do.
                parent_name, _, child = name.rpartition(".")
                parent = stage.get_submodule(parent_name) if parent_name else stage
                setattr(parent, child, nn.Identity())
            changed += 1
    return changed


class SamePad:
    """Forward pre-hook: zero-pad a stride-1 conv's input so the output keeps the input size."""

    def __init__(self, conv: nn.Conv2d) -> None:
        pads: list[int] = []
        # F.pad wants (left, right, top, bottom): last dimension first. The odd pixel goes
        # right/bottom, as padding='same' does.
        for k, d, p in zip(reversed(conv.kernel_size), reversed(conv.dilation),
                           reversed(conv.padding)):
            extra = d * (k - 1) - 2 * p
            pads += [extra // 2, extra - extra // 2]
        self.pads = tuple(pads)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (F.pad(args[0], self.pads), *args[1:])


def _pool_stride(pool: nn.Module) -> int:
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return max(stride) if isinstance(stride, tuple) else int(stride)


def out_channels(module: nn.Module) -> int:
    """Channels of a ResNet-like stage's output: the size of its last normalisation layer."""
    last = None
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            last = m
    if last is None:
        raise ValueError(f"cannot read the output width of {type(module).__name__}")
    return int(last.num_features)


def create_backbone(name: str, last_stride: int, timm_kwargs: dict | None = None,
                    img_size: tuple[int, int] | None = None) -> nn.Module:
    """A registered backbone, or any timm model as `timm:<name>`.

    `timm_kwargs` (MODEL.TIMM_KWARGS) go to `timm.create_model`; `img_size` (INPUT.SIZE_TRAIN) is
    passed as timm's `img_size` to the models that take one (ViT, Swin...) unless given there.
    """
    check_last_stride(last_stride)
    prefix = family_of(name)
    if prefix is not None:
        return BACKBONE_FAMILIES.get(prefix)(name[len(prefix):], last_stride, timm_kwargs, img_size)
    if timm_kwargs:
        raise ConfigError(
            f"MODEL.TIMM_KWARGS = {timm_kwargs!r} applies to timm backbones ('timm:<name>'), not to "
            f"MODEL.NAME {name!r}; clear it or name the timm model."
        )
    try:
        factory = BACKBONES.get(name)
    except StrongReIDError as exc:
        raise ConfigError(
            f"MODEL.NAME = {name!r}: {exc} Any timm model also works as 'timm:<name>'."
        ) from None
    backbone = factory(last_stride)
    backbone.arch = name
    return backbone


def init_transformer_weights(module: nn.Module, skip_prefix: str | None = None) -> None:
    """The from-scratch initialisation ViT and Swin code shares: truncated N(0, 0.02) Linear
    weights with zero biases, unit LayerNorms (Linear layers under `skip_prefix` keep theirs)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and not (skip_prefix and name.startswith(skip_prefix)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
