"""layumi's heads (Person_reID_baseline_pytorch, model.py): `ClassBlock` and PCB.

Module names follow layumi's, so its checkpoints map onto ours by renaming the backbone prefix
only (layumi `model.` -> ours `backbone.`; docs/coming-from-layumi.md has the whole table):

    layumi ft_net*.classifier (ClassBlock)   -> LayumiModel.classifier (ClassBlock)
        .add_block.0 Linear(C, linear_num)   ->     .add_block.0
        .add_block.1 BatchNorm1d             ->     .add_block.1
        (.add_block.2 LeakyReLU(0.1))        ->     (.add_block.2, MODEL.HEAD_RELU)
        .add_block.k Dropout(droprate)       ->     .add_block.k
        .classifier.0 Linear(linear_num, N)  ->     .classifier.0
    layumi PCB.classifier{i} (ClassBlock)    -> PCBModel.classifier{i}
    layumi PCB.avgpool / .dropout            -> PCBModel.avgpool / .dropout (no parameters)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from strongreid.errors import ConfigError
from strongreid.modeling.heads import HEADS, build_pooling
from strongreid.modeling.outputs import ModelOutput


def layumi_init_kaiming(m: nn.Module) -> None:
    """layumi's init: fan-in Conv, fan-out Linear, BatchNorm1d scale N(1, 0.02); zero biases."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
    elif isinstance(m, nn.Linear):
        nn.init.kaiming_normal_(m.weight, a=0, mode="fan_out")
    elif isinstance(m, nn.BatchNorm1d):
        nn.init.normal_(m.weight, 1.0, 0.02)
    if getattr(m, "bias", None) is not None:
        nn.init.zeros_(m.bias)


# layumi's weights_init_classifier draws std 0.0001 (model.py); the BNNeck head's 0.001 is the
# strong baseline's and stays in modeling/heads.py.
LAYUMI_CLASSIFIER_STD = 1e-4


def layumi_init_classifier(m: nn.Module) -> None:
    """layumi's classifier init: N(0, 0.0001^2) weights, zero bias."""
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=LAYUMI_CLASSIFIER_STD)
        nn.init.zeros_(m.bias)


class ClassBlock(nn.Module):
    """Linear(C, linear) -> BatchNorm1d -> (LeakyReLU 0.1) -> Dropout -> classifier Linear.

    `embed(x)` is the `add_block` output, layumi's test feature (its test.py replaces
    `classifier.classifier` by an empty Sequential). linear 0 drops the Linear (BN on C).
    """

    def __init__(self, input_dim: int, num_classes: int, droprate: float, relu: bool = False,
                 bnorm: bool = True, linear: int = 512) -> None:
        super().__init__()
        if linear < 0:
            raise ConfigError(f"MODEL.LINEAR_NUM = {linear} must be >= 0 (0: no embedding Linear).")
        if not 0.0 <= droprate < 1.0:
            raise ConfigError(f"MODEL.DROPRATE = {droprate} must lie in [0, 1).")
        block: list[nn.Module] = []
        if linear > 0:
            block.append(nn.Linear(input_dim, linear))
        else:
            linear = input_dim
        if bnorm:
            block.append(nn.BatchNorm1d(linear))
        if relu:
            block.append(nn.LeakyReLU(0.1))
        if droprate > 0:
            block.append(nn.Dropout(p=droprate))
        self.add_block = nn.Sequential(*block)
        self.add_block.apply(layumi_init_kaiming)
        self.classifier = nn.Sequential(nn.Linear(linear, num_classes))
        self.classifier.apply(layumi_init_classifier)
        self.linear_num = int(linear)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_block(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, embedding): layumi's `return_f` form."""
        f = self.add_block(x)
        return self.classifier(f), f


@HEADS.register("layumi")
class LayumiModel(nn.Module):
    """layumi's ft_net family: backbone -> global pooling -> ClassBlock.

    Training forward -> ModelOutput(logits, linear_num-d embedding: the feature layumi's metric
    losses see);
    eval forward -> the same embedding (BN applied, dropout off), layumi's test feature.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, pool: nn.Module, linear_num: int = 512,
                 droprate: float = 0.5, relu: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"the training split has {num_classes} identities; need at least 1.")
        self.backbone = backbone
        self.pool = pool
        self.classifier = ClassBlock(int(backbone.feat_dim), num_classes, droprate, relu=relu,
                                     linear=linear_num)
        self.feat_dim = self.classifier.linear_num
        self.num_classes = int(num_classes)
        self.arch = str(getattr(backbone, "arch", type(backbone).__name__))
        # Parameter prefixes whose shape depends on the class count (skipped on cross-domain load).
        self.class_layers = ("classifier.classifier.",)

    @classmethod
    def from_config(cls, cfg, backbone: nn.Module, num_classes: int) -> LayumiModel:
        """MODEL.HEAD 'layumi': MODEL.POOLING / GEM_P, LINEAR_NUM, DROPRATE, HEAD_RELU."""
        m = cfg.MODEL
        return cls(backbone, num_classes, build_pooling(m.POOLING, m.GEM_P),
                   linear_num=m.LINEAR_NUM, droprate=m.DROPRATE, relu=bool(m.HEAD_RELU))

    def forward(self, x: torch.Tensor) -> torch.Tensor | ModelOutput:
        pooled = self.pool(self.backbone(x))
        if self.training:
            return ModelOutput(*self.classifier(pooled))
        return self.classifier.embed(pooled)


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


