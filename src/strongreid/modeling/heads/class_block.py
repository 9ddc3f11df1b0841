"""The ClassBlock head, as layumi's Person_reID_baseline_pytorch builds it (model.py): backbone
-> pool -> Linear -> BatchNorm1d -> (LeakyReLU) -> Dropout -> classifier; MODEL.HEAD 'layumi'.

Module names follow layumi's, so its checkpoints map onto ours by renaming the backbone prefix
only (layumi `model.` -> ours `backbone.`; docs/coming-from-layumi.md has the whole table):

    layumi ft_net*.classifier (ClassBlock)   -> LayumiModel.classifier (ClassBlock)
        .add_block.0 Linear(C, linear_num)   ->     .add_block.0
        .add_block.1 BatchNorm1d             ->     .add_block.1
        (.add_block.2 LeakyReLU(0.1))        ->     (.add_block.2, MODEL.HEAD_RELU)
        .add_block.k Dropout(droprate)       ->     .add_block.k
        .classifier.0 Linear(linear_num, N)  ->     .classifier.0
"""

from __future__ import annotations

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
