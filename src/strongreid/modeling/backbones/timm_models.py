"""SENet family (through timm's ports of the Cadene models) and any timm model by name.

The original's SE-ResNet / SE-ResNeXt / SENet-154 come from Cadene's `pretrainedmodels`; timm's
`legacy_*` models are the same networks with the same parameter names (layer0.conv1, se_module.fc1,
last_linear...), so Cadene files and the original project's checkpoints load by name.
"""

from __future__ import annotations

import logging
import sys

import timm
import torch
import torch.nn as nn

from strongreid.errors import ConfigError
from strongreid.modeling.backbones.base import (
    BACKBONE_FAMILIES,
    BACKBONES,
    TIMM_PREFIX,
    apply_last_stride,
)

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

    def __init__(self, timm_name: str, last_stride: int, arch: str | None = None,
                 kwargs: dict | None = None, img_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        model = _create(timm_name, dict(kwargs or {}), img_size)
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
        family = type(self.model).__name__
        if last_stride != 2 and family in _FIXED_STRIDE:
            raise ConfigError(
                f"MODEL.LAST_STRIDE = {last_stride} is not possible with {self.arch}: "
                f"{_FIXED_STRIDE[family]} Set MODEL.LAST_STRIDE 2."
            )
        info = getattr(self.model, "feature_info", None)
        stages = list(info) if info is not None else []
        if len(stages) >= 2 and stages[-1]["reduction"] > stages[-2]["reduction"]:
            stage = self.model.get_submodule(stages[-1]["module"])
            if apply_last_stride(stage, last_stride):
                return
            # The downsampling sits between the last two stages: DenseNet's transition3 pool,
            # EfficientNet's blocks.5 (timm reports blocks.4 and blocks.6 as the stages).
            between = _modules_between(self.model, stages[-2]["module"], stages[-1]["module"])
            if apply_last_stride(self.model, last_stride, names=between):
                return
        if last_stride != 2:
            logger.warning(
                "MODEL.LAST_STRIDE = %d is not applicable to %s: its last stage has no strided "
                "conv or pooling to change; the backbone keeps its own output stride",
                last_stride, self.arch,
            )

    def adapt_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ImageNet weights made to fit this model's size: timm's own `checkpoint_filter_fn`
        of the model's family resamples ViT position embeddings (and Swin's bias tables) from
        the 224x224 grid to this img_size. Other families get the state unchanged."""
        module = sys.modules.get(type(self.model).__module__)
        fn = getattr(module, "checkpoint_filter_fn", None)
        if fn is None:
            return dict(state)
        try:
            return fn(dict(state), self.model)
        except (KeyError, RuntimeError, ValueError) as exc:
            logger.warning("%s: timm could not adapt the weights to img_size (%s); loading as is",
                           self.arch, exc)
            return dict(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model.forward_features(x)
        if y.ndim == 4 and self.output_fmt.upper().endswith("NHWC"):
            y = y.permute(0, 3, 1, 2)
        elif y.ndim == 3:
            # Token models (ViT): B x N x C becomes a B x C x N x 1 "map", so that average pooling
            # is the mean over all tokens (class token included).
            y = y.transpose(1, 2).unsqueeze(-1)
        return y


# timm model classes whose last stage cannot keep the resolution, and why.
_FIXED_STRIDE = {
    "HighResolutionNet": "HRNet fuses its four branches at fixed 1/4..1/32 resolutions (the "
                         "incre/downsample head expects the 1/32 branch), so the last stride "
                         "cannot be removed.",
}


def _create(timm_name: str, kwargs: dict, img_size: tuple[int, int] | None) -> nn.Module:
    """timm.create_model without head; `img_size` is added for the models that accept it."""
    base = {"pretrained": False, "num_classes": 0, "global_pool": ""}
    clash = sorted(set(kwargs) & set(base))
    if clash:
        raise ConfigError(f"MODEL.TIMM_KWARGS may not set {', '.join(clash)}: strongreid sets them.")
    auto = img_size is not None and "img_size" not in kwargs
    attempts = [{**kwargs, "img_size": tuple(img_size)}, kwargs] if auto else [kwargs]
    for i, extra in enumerate(attempts):
        try:
            return timm.create_model(timm_name, **base, **extra)
        except TypeError as exc:
            # A CNN takes no img_size: retry without the one we added, never without the user's.
            if i + 1 < len(attempts) and "img_size" in str(exc):
                continue
            raise ConfigError(
                f"MODEL.TIMM_KWARGS = {kwargs!r}: timm's {timm_name} rejects them ({exc})."
            ) from None
        except RuntimeError as exc:  # timm's "Unknown model" error
            if "Unknown model" not in str(exc):
                raise
            close = timm.list_models(f"*{timm_name}*")[:5]
            hint = f" Similar timm models: {', '.join(close)}." if close else ""
            raise ConfigError(f"MODEL.NAME: timm has no model {timm_name!r} ({exc}).{hint}") from None
    raise AssertionError("unreachable")


def _modules_between(model: nn.Module, before: str, last: str) -> set[str]:
    """Names of the modules after stage `before`'s subtree, up to the end of stage `last`'s."""
    names = [n for n, _ in model.named_modules()]
    inside = lambda n, root: n == root or n.startswith(root + ".")  # noqa: E731
    start = max(i for i, n in enumerate(names) if inside(n, before)) + 1
    end = max(i for i, n in enumerate(names) if inside(n, last)) + 1
    return set(names[start:end])


def _register_senet(name: str, timm_name: str) -> None:
    def factory(last_stride: int) -> nn.Module:
        return TimmBackbone(timm_name, last_stride, arch=name)

    factory.__name__ = name
    BACKBONES.register(name)(factory)


for _name, _timm_name in SENET_NAMES.items():
    _register_senet(_name, _timm_name)


@BACKBONE_FAMILIES.register(TIMM_PREFIX)
def create_timm_backbone(timm_name: str, last_stride: int, kwargs: dict | None = None,
                         img_size: tuple[int, int] | None = None) -> nn.Module:
    """MODEL.NAME 'timm:<name>': any timm model, MODEL.TIMM_KWARGS passed to timm."""
    return TimmBackbone(timm_name, last_stride, arch=TIMM_PREFIX + timm_name, kwargs=kwargs,
                        img_size=img_size)
