"""PCB (Sun et al., "Beyond Part Models", 2018) as layumi's Person_reID_baseline_pytorch builds
it (model.py): the map pooled into horizontal stripes, one ClassBlock per stripe; MODEL.HEAD 'pcb'.

    layumi PCB.classifier{i} (ClassBlock)    -> PCBModel.classifier{i}
    layumi PCB.avgpool / .dropout            -> PCBModel.avgpool / .dropout (no parameters)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from strongreid.errors import ConfigError
from strongreid.modeling.heads import HEADS
from strongreid.modeling.heads.class_block import (
    ClassBlock,
)
from strongreid.modeling.outputs import ModelOutput


@HEADS.register("pcb")
class PCBModel(nn.Module):
    """PCB (Sun et al. 2018) as layumi's: the map pooled into P horizontal stripes, dropout 0.5,
    one ClassBlock(C, N, linear 256, no ReLU) per stripe.

    Training forward -> ModelOutput([P logits], B x (C*P) stripe features); the ID loss sums over stripes.
    Eval forward -> layumi's test feature: every C-d stripe divided by its norm times sqrt(P)
    (each stripe counts equally and the whole vector has unit norm), flattened channel-major
    (index c*P + p) like layumi's `ff.view(n, -1)` on its n x C x P tensor. With flip or
    multi-scale, the raw stripes of all views are summed first and normalised once
    (`test_view_feature` / `merge_test_views`, used by engine/inference.py: tta_forward).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, parts: int = 6, linear_num: int = 256,
                 droprate: float = 0.5, relu: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"the training split has {num_classes} identities; need at least 1.")
        if parts < 1:
            raise ConfigError(f"MODEL.PCB_PARTS = {parts} must be at least 1 (PCB uses 6).")
        self.backbone = backbone
        self.parts = int(parts)
        self.avgpool = nn.AdaptiveAvgPool2d((self.parts, 1))
        self.dropout = nn.Dropout(p=droprate)
        channels = int(backbone.feat_dim)
        for i in range(self.parts):
            setattr(self, f"classifier{i}",
                    ClassBlock(channels, num_classes, droprate, relu=relu, linear=linear_num))
        self.feat_dim = channels * self.parts
        self.num_classes = int(num_classes)
        self.arch = str(getattr(backbone, "arch", type(backbone).__name__))
        self.class_layers = tuple(f"classifier{i}.classifier." for i in range(self.parts))

    @classmethod
    def from_config(cls, cfg, backbone: nn.Module, num_classes: int) -> PCBModel:
        """MODEL.HEAD 'pcb': MODEL.PCB_PARTS, PCB_LINEAR_NUM, DROPRATE, HEAD_RELU."""
        m = cfg.MODEL
        return cls(backbone, num_classes, parts=m.PCB_PARTS, linear_num=m.PCB_LINEAR_NUM,
                   droprate=m.DROPRATE, relu=bool(m.HEAD_RELU))

    def stripes(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x P stripe features (average pooling per horizontal stripe)."""
        fmap = self.backbone(x)
        if fmap.shape[2] < self.parts:
            raise ConfigError(
                f"MODEL.PCB_PARTS = {self.parts} stripes need a feature map at least {self.parts} "
                f"high; {self.arch} gives {fmap.shape[2]} rows at this input size. Use a larger "
                "INPUT.SIZE_TRAIN / SIZE_TEST (PCB: [384, 192]), MODEL.LAST_STRIDE 1 or fewer parts."
            )
        return self.avgpool(fmap).flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor | ModelOutput:
        parts = self.stripes(x)
        if self.training:
            dropped = self.dropout(parts)
            logits = [getattr(self, f"classifier{i}")(dropped[:, :, i])[0] for i in range(self.parts)]
            return ModelOutput(logits, parts.flatten(1))
        return self.merge_test_views(parts.float().flatten(1))

    def test_view_feature(self, x: torch.Tensor) -> torch.Tensor:
        """One view's raw stripes, B x (C*P) channel-major in fp32: what test-time augmentation
        sums over views (image, mirror, scales) before `merge_test_views`, as layumi's test.py."""
        return self.stripes(x).float().flatten(1)

    def merge_test_views(self, summed: torch.Tensor) -> torch.Tensor:
        """The test feature of summed raw stripes: each stripe over its norm times sqrt(P)."""
        # fp32: the per-stripe norm of a bf16 map loses the small stripes.
        parts = summed.float().view(summed.shape[0], -1, self.parts)
        parts = parts / (parts.norm(p=2, dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(self.parts))
        return parts.flatten(1)


