"""torchreid's head (deep-person-reid): global average pooling -> fc -> classifier with bias.

torchreid's OSNet and ResNet-fc512 put `fc = Sequential(Linear(C, 512), BatchNorm1d(512), ReLU)`
after the pooled map and test on its output; its plain ResNets have no fc and test on the pooled
feature. The classifier is a Linear with bias on that feature. Module names are torchreid's
(`fc.0`, `fc.1`, `classifier`), so a torchreid state dict maps onto this model by putting
`backbone.` before the backbone's keys. With MODEL.HEAD 'torchreid' it also trains (torchreid's
softmax / triplet engines: the ID loss on the logits, the metric losses on the fc output).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from strongreid.errors import ConfigError
from strongreid.modeling.heads import HEADS, build_pooling
from strongreid.modeling.outputs import ModelOutput


@HEADS.register("torchreid")
class TorchreidModel(nn.Module):
    """backbone -> pool -> (fc: Linear-BN-ReLU to `fc_dim`) -> classifier (Linear with bias).

    Training forward -> ModelOutput(logits, feature); eval forward -> the feature (fc output, or the pooled
    map when `fc_dim` is 0), torchreid's test feature.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, pool: nn.Module, fc_dim: int = 512) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"the training split has {num_classes} identities; need at least 1.")
        if fc_dim < 0:
            raise ConfigError(f"MODEL.LINEAR_NUM = {fc_dim} must be >= 0 (0: no fc layer).")
        self.backbone = backbone
        self.pool = pool
        channels = int(backbone.feat_dim)
        if fc_dim > 0:
            self.fc: nn.Sequential | None = nn.Sequential(
                nn.Linear(channels, fc_dim), nn.BatchNorm1d(fc_dim), nn.ReLU(inplace=True))
            self.feat_dim = int(fc_dim)
        else:
            self.fc = None
            self.feat_dim = channels
        self.classifier = nn.Linear(self.feat_dim, int(num_classes))
        self.num_classes = int(num_classes)
        self.arch = str(getattr(backbone, "arch", type(backbone).__name__))
        # Parameter prefixes whose shape depends on the class count (skipped on cross-domain load).
        self.class_layers = ("classifier.",)
        self._init_head()

    @classmethod
    def from_config(cls, cfg, backbone: nn.Module, num_classes: int) -> TorchreidModel:
        """MODEL.HEAD 'torchreid': MODEL.POOLING / GEM_P and the fc width MODEL.LINEAR_NUM."""
        return cls(backbone, num_classes, build_pooling(cfg.MODEL.POOLING, cfg.MODEL.GEM_P),
                   fc_dim=cfg.MODEL.LINEAR_NUM)

    def _init_head(self) -> None:
        # torchreid's _init_params for these layer types: N(0, 0.01) Linear, unit-scale BN.
        for m in [*(self.fc or []), self.classifier]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor | ModelOutput:
        v = self.pool(self.backbone(x))
        if self.fc is not None:
            v = self.fc(v)
        if self.training:
            return ModelOutput(self.classifier(v), v)
        return v
