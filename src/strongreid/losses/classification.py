"""ID losses: cross-entropy and label-smoothing cross-entropy."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from strongreid.errors import ConfigError
from strongreid.losses.common import at_least_fp32
from strongreid.losses.registry import ID_LOSSES, LOSSES


@LOSSES.register("cross_entropy")
class CrossEntropyLoss(nn.Module):
    """Plain softmax cross-entropy, mean over the batch, computed in at least fp32."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(at_least_fp32(logits), targets)


@LOSSES.register("label_smooth_ce")
class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy against q_k = (1 - eps)[k = y] + eps / K (Szegedy et al.).

    The original's convention: the target class also gets eps/K, so it holds 1 - eps + eps/K.
    The targets are built on the logits' device (the original hard-codes .cuda()).
    """

    def __init__(self, num_classes: int, epsilon: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ConfigError(f"MODEL.LABEL_SMOOTH_EPSILON = {epsilon} must lie in [0, 1).")
        self.num_classes = int(num_classes)
        self.epsilon = float(epsilon)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(at_least_fp32(logits), dim=1)
        q = torch.full_like(log_probs, self.epsilon / self.num_classes)
        q.scatter_(1, targets.unsqueeze(1), 1.0 - self.epsilon + self.epsilon / self.num_classes)
        return (-q * log_probs).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, epsilon={self.epsilon}"


@ID_LOSSES.register("softmax")
class SoftmaxIDLoss:
    """MODEL.ID_LOSS_TYPE 'softmax': the original's bias-free classifier logits straight into the
    (label-smoothing) cross-entropy."""

    @staticmethod
    def from_config(cfg: CfgNode, ce: nn.Module) -> nn.Module:
        return ce
