"""SOLIDER-REID's model around its Swin (`build_transformer` in its make_model.py): MODEL.HEAD 'solider'.

    Swin map -> global average pool -> global feature -> BatchNorm1d (shift frozen) -> classifier

(a Linear without bias). Its configs test on the global feature before the BN (TEST.NECK_FEAT
'before') and L2-normalise it; 'after' gives the BN output. The head owns the two keys of the
backbone that SOLIDER sets from its model class: MODEL.SEMANTIC_WEIGHT (the semantic controller's
lambda, a test-time choice too: the weights do not record it) and MODEL.DROP_PATH. Module names
are SOLIDER's with `backbone.` for its `base.`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from strongreid.errors import ConfigError
from strongreid.modeling.backbones.solider_swin import SOLIDER_SWINS, SoliderSwin
from strongreid.modeling.heads import HEADS, make_bnneck, weights_init_classifier
from strongreid.modeling.outputs import ModelOutput


@HEADS.register("solider")
class SoliderModel(nn.Module):
    """Training forward -> ModelOutput(logits of the BN feature, global feature); eval -> the test feature."""

    def __init__(self, backbone: SoliderSwin, num_classes: int, neck_feat: str = "before") -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"the training split has {num_classes} identities; need at least 1.")
        if neck_feat not in ("after", "before"):
            raise ConfigError(f"TEST.NECK_FEAT = {neck_feat!r}: use 'before' (SOLIDER's) or 'after'.")
        self.backbone = backbone
        self.feat_dim = int(backbone.feat_dim)
        self.num_classes = int(num_classes)
        self.neck_feat = neck_feat
        self.arch = str(getattr(backbone, "arch", type(backbone).__name__))
        self.bottleneck = make_bnneck(self.feat_dim)
        self.classifier = nn.Linear(self.feat_dim, self.num_classes, bias=False)
        self.classifier.apply(weights_init_classifier)
        self.class_layers = ("classifier.",)

    @classmethod
    def check(cls, cfg: CfgNode) -> None:
        """MODEL.NAME is a SOLIDER Swin; MODEL.SEMANTIC_WEIGHT <= 1; 0 <= MODEL.DROP_PATH < 1."""
        m = cfg.MODEL
        if m.NAME not in SOLIDER_SWINS:
            raise ConfigError(
                f"MODEL.HEAD 'solider' puts SOLIDER's neck on its own Swin: MODEL.NAME must be one of "
                f"{', '.join(SOLIDER_SWINS)}, not {m.NAME!r}."
            )
        if m.SEMANTIC_WEIGHT > 1.0:
            raise ConfigError(
                f"MODEL.SEMANTIC_WEIGHT = {m.SEMANTIC_WEIGHT}: lambda lies in [0, 1] (SOLIDER's ReID "
                "uses 0.2), or is negative for a Swin without the semantic controller."
            )
        if not 0.0 <= m.DROP_PATH < 1.0:
            raise ConfigError(f"MODEL.DROP_PATH = {m.DROP_PATH} must lie in [0, 1) (SOLIDER: 0.1).")

    @classmethod
    def from_config(cls, cfg: CfgNode, backbone: nn.Module, num_classes: int) -> SoliderModel:
        """MODEL.HEAD 'solider': MODEL.SEMANTIC_WEIGHT, MODEL.DROP_PATH, TEST.NECK_FEAT."""
        if not isinstance(backbone, SoliderSwin):
            raise ConfigError(
                f"MODEL.HEAD 'solider' needs a SOLIDER Swin backbone ({', '.join(SOLIDER_SWINS)}), "
                f"not {getattr(backbone, 'arch', type(backbone).__name__)}."
            )
        cls.check(cfg)
        backbone.set_semantic_weight(cfg.MODEL.SEMANTIC_WEIGHT)
        backbone.set_drop_path(cfg.MODEL.DROP_PATH)
        return cls(backbone, num_classes, neck_feat=cfg.TEST.NECK_FEAT)

    def forward(self, x: torch.Tensor) -> torch.Tensor | ModelOutput:
        global_feat = F.adaptive_avg_pool2d(self.backbone(x), 1).flatten(1)
        feat = self.bottleneck(global_feat)
        if self.training:
            return ModelOutput(self.classifier(feat), global_feat)
        return global_feat if self.neck_feat == "before" else feat
