"""The strong baseline's model: backbone -> GAP (or GeM) -> BNNeck -> bias-free classifier."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from yacs.config import CfgNode

from strongreid.config.components import selected
from strongreid.config.loader import timm_kwargs
from strongreid.errors import ConfigError
from strongreid.modeling.backbones import create_backbone
from strongreid.modeling.cosine import use_cosine_classifier
from strongreid.modeling.heads import (
    HEADS,
    build_head_model,
    build_pooling,
    make_bnneck,
    weights_init_classifier,
)
from strongreid.modeling.init_options import apply_init_options
from strongreid.modeling.non_local import add_non_local
from strongreid.modeling.outputs import ModelOutput

logger = logging.getLogger(__name__)


@HEADS.register("baseline")
class ReIDModel(nn.Module):
    """Training forward -> ModelOutput(logits, pre-BN global feature); eval forward -> the test feature.

    With neck 'bnneck' the ID loss sees the BN feature and triplet/center loss the pre-BN one
    (Luo et al.'s BNNeck); the test feature is the BN feature ('after') or the pre-BN one
    ('before'). With neck 'no' the classifier is a plain Linear with bias on the pooled feature.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        neck: str = "bnneck",
        neck_feat: str = "after",
        pooling: str = "avg",
        gem_p: float = 3.0,
        head_fp32: bool = False,
        metric_feat: str = "before",
    ) -> None:
        super().__init__()
        if neck not in ("bnneck", "no"):
            raise ConfigError(f"MODEL.NECK = {neck!r}: use 'bnneck' or 'no'.")
        if neck_feat not in ("after", "before"):
            raise ConfigError(f"TEST.NECK_FEAT = {neck_feat!r}: use 'after' or 'before'.")
        if metric_feat not in ("after", "before"):
            raise ConfigError(f"MODEL.METRIC_FEAT = {metric_feat!r}: use 'before' or 'after'.")
        if num_classes < 1:
            raise ConfigError(f"the training split has {num_classes} identities; need at least 1.")
        self.backbone = backbone
        self.pool = build_pooling(pooling, gem_p)
        self.feat_dim = int(backbone.feat_dim)
        self.num_classes = int(num_classes)
        self.neck = neck
        self.neck_feat = neck_feat
        self.metric_feat = metric_feat
        # MODEL.HEAD_PRECISION 'fp32': pooling, BNNeck and classifier leave the autocast region
        self.head_fp32 = bool(head_fp32)
        self.arch = str(getattr(backbone, "arch", type(backbone).__name__))
        if neck == "bnneck":
            self.bottleneck: nn.BatchNorm1d | None = make_bnneck(self.feat_dim)
            self.classifier = nn.Linear(self.feat_dim, self.num_classes, bias=False)
            self.classifier.apply(weights_init_classifier)
        else:
            self.bottleneck = None
            self.classifier = nn.Linear(self.feat_dim, self.num_classes)

    @classmethod
    def from_config(cls, cfg: CfgNode, backbone: nn.Module, num_classes: int) -> ReIDModel:
        """MODEL.HEAD 'baseline': MODEL.NECK, TEST.NECK_FEAT, MODEL.POOLING / GEM_P, HEAD_PRECISION."""
        return cls(backbone, num_classes, neck=cfg.MODEL.NECK, neck_feat=cfg.TEST.NECK_FEAT,
                   pooling=cfg.MODEL.POOLING, gem_p=cfg.MODEL.GEM_P,
                   head_fp32=cfg.MODEL.HEAD_PRECISION == "fp32", metric_feat=cfg.MODEL.METRIC_FEAT)

    def forward(self, x: torch.Tensor) -> torch.Tensor | ModelOutput:
        fmap = self.backbone(x)
        if self.head_fp32 and torch.is_autocast_enabled(fmap.device.type):
            # The head is a few kFLOPs per image next to the backbone's MFLOPs: fp32 there is
            # free, and it keeps bf16 rounding out of the embedding and the logits.
            with torch.autocast(device_type=fmap.device.type, enabled=False):
                return self._head(fmap.float())
        return self._head(fmap)

    def _head(self, fmap: torch.Tensor) -> torch.Tensor | ModelOutput:
        global_feat = self.pool(fmap)
        feat = global_feat if self.bottleneck is None else self.bottleneck(global_feat)
        if self.training:
            return ModelOutput(self.classifier(feat), global_feat if self.metric_feat == "before" else feat)
        return feat if self.neck_feat == "after" else global_feat


def build_model(cfg: CfgNode, num_classes: int) -> nn.Module:
    """The backbone of MODEL.NAME with the head of MODEL.HEAD, initialised as MODEL.PRETRAIN_CHOICE says."""
    from strongreid.modeling import weights

    # A head whose backbone's shape follows its own keys (TransReID: patch stride, SIE, JPM)
    # builds that backbone itself.
    own_backbone = getattr(selected(cfg, "MODEL.HEAD"), "backbone_from_config", None)
    if own_backbone is not None:
        backbone = own_backbone(cfg)
    else:
        backbone = create_backbone(cfg.MODEL.NAME, cfg.MODEL.LAST_STRIDE, timm_kwargs(cfg),
                                   img_size=tuple(cfg.INPUT.SIZE_TRAIN))
    if cfg.MODEL.NON_LOCAL:  # AGW's non-local blocks (modeling/non_local.py)
        add_non_local(backbone, list(cfg.MODEL.NL_LAYERS), cfg.MODEL.NL_INTER_CHANNELS)
    model = build_head_model(cfg, backbone, num_classes)
    apply_init_options(cfg, model)  # MODEL.CLASSIFIER_INIT_STD / ZERO_INIT_RESIDUAL; no-op at their defaults
    if cfg.MODEL.ID_LOSS_TYPE != "softmax":  # margin ID losses need cosine logits
        use_cosine_classifier(model)
    choice = cfg.MODEL.PRETRAIN_CHOICE
    path = cfg.MODEL.PRETRAIN_PATH
    if choice == "imagenet":
        if path:
            weights.load_backbone_file(backbone, path)
        else:
            weights.load_published_weights(backbone)
        copy_stages = getattr(model, "backbone_loaded", None)
        if copy_stages is not None:  # heads that copy backbone stages (MGN's branches) copy the weights
            copy_stages(backbone)
    elif choice == "self":
        if not path:
            raise ConfigError(
                "MODEL.PRETRAIN_CHOICE 'self' needs MODEL.PRETRAIN_PATH: the strongreid checkpoint "
                "to start from."
            )
        weights.load_test_weights(model, path)
    elif choice != "none":
        raise ConfigError(
            f"MODEL.PRETRAIN_CHOICE = {choice!r}: use 'imagenet', 'self' or 'none'."
        )
    return model
