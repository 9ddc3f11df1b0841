"""SENet family (through timm's ports of the Cadene models) and any timm model by name.

The original's SE-ResNet / SE-ResNeXt / SENet-154 come from Cadene's `pretrainedmodels`; timm's
`legacy_*` models are the same networks with the same parameter names (layer0.conv1, se_module.fc1,
last_linear...), so Cadene files and the original project's checkpoints load by name.
"""

from __future__ import annotations

import logging

import timm
import torch
import torch.nn as nn

from strongreid.errors import ConfigError
from strongreid.modeling.backbones.base import BACKBONES, apply_last_stride

logger = logging.getLogger(__name__)

# The original's MODEL.NAME -> timm 1.0 model name.
SENET_NAMES = {
    "se_resnet50": "legacy_seresnet50",
    "se_resnet101": "legacy_seresnet101",
    "se_resnet152": "legacy_seresnet152",
    "se_resnext50": "legacy_seresnext50_32x4d",
    "se_resnext101": "legacy_seresnext101_32x4d",
    "senet154": "legacy_senet154",
}

# Parts that only timm's forward_head uses. Left in place they would sit in the state dict and
# the optimiser without ever receiving a gradient (and upset DDP's unused-parameter check).
_HEAD_ATTRS = ("head", "fc", "last_linear", "classifier", "fc_norm", "head_drop")


class TimmBackbone(nn.Module):
    """`timm.create_model(name)` without head; forward returns the last feature map (B x C x H x W).

    LAST_STRIDE rewrites the strided layers of the last stage (timm's `feature_info`), which covers
    ResNet-like stages (first block's conv and shortcut) and ConvNeXt (its downsample conv). Where
    the last stage does not downsample with a conv or pool (ViT, Swin) we warn and leave it.
    """

    def __init__(self, timm_name: str, last_stride: int, arch: str | None = None) -> None:
        super().__init__()
        try:
            model = timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool="")
        except RuntimeError as exc:  # timm's "Unknown model" error
            close = timm.list_models(f"*{timm_name}*")[:5]
            hint = f" Similar timm models: {', '.join(close)}." if close else ""
            raise ConfigError(f"MODEL.NAME: timm has no model {timm_name!r} ({exc}).{hint}") from None
        for attr in _HEAD_ATTRS:
            if isinstance(getattr(model, attr, None), nn.Module):
                setattr(model, attr, nn.Identity())
        self.model = model
        self.arch = arch or f"timm:{timm_name}"
        self.feat_dim = int(model.num_features)
        self.output_fmt = str(getattr(model, "output_fmt", "NCHW"))
        self.weights_source = ("timm", timm_name)
        self._set_last_stride(last_stride)

    def _set_last_stride(self, last_stride: int) -> None:
        info = getattr(self.model, "feature_info", None)
        stages = list(info) if info is not None else []
        if len(stages) >= 2 and stages[-1]["reduction"] > stages[-2]["reduction"]:
            stage = self.model.get_submodule(stages[-1]["module"])
            if apply_last_stride(stage, last_stride):
                return
        if last_stride != 2:
            logger.warning(
                "MODEL.LAST_STRIDE = %d is not applicable to %s: its last stage has no strided "
                "conv or pooling to change; the backbone keeps its own output stride",
                last_stride, self.arch,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model.forward_features(x)
        if y.ndim == 4 and self.output_fmt.upper().endswith("NHWC"):
            y = y.permute(0, 3, 1, 2)
        elif y.ndim == 3:
            # Token models (ViT): B x N x C becomes a B x C x N x 1 "map", so that average pooling
            # is the mean over all tokens (class token included).
            y = y.transpose(1, 2).unsqueeze(-1)
        return y


def _register_senet(name: str, timm_name: str) -> None:
    def factory(last_stride: int) -> nn.Module:
        return TimmBackbone(timm_name, last_stride, arch=name)

    factory.__name__ = name
    BACKBONES.register(name)(factory)


for _name, _timm_name in SENET_NAMES.items():
    _register_senet(_name, _timm_name)
