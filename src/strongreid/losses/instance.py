"""Instance loss (Zheng et al., "Dual-path convolutional image-text embeddings", TOMM 2020)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from strongreid.errors import ConfigError
from strongreid.losses.pairwise import cosine_matrix
from strongreid.losses.registry import LOSSES, PAIR_LOSSES


@LOSSES.register("instance")
@PAIR_LOSSES.register("instance")
class InstanceLoss(nn.Module):
    """Cross-entropy of the scaled cosine-similarity matrix gamma * S (B x B), mean over rows.

    target 'image' (default): every image is its own class (row i's target is column i), the
    paper's instance loss within a batch and pytorch-metric-learning's InstanceLoss without
    labels. 'layumi': the target of row i is the rank of its identity among the batch's sorted
    identities (`torch.unique(..., return_inverse=True)`), exactly what layumi's and
    pytorch-metric-learning's code do with labels; that column is an image of the same identity
    only by chance, so use it to reproduce layumi, not for new work.
    """

    weight_key = "SOLVER.INSTANCE_LOSS_WEIGHT"

    @classmethod
    def from_config(cls, cfg: CfgNode) -> InstanceLoss:
        return cls(cfg.SOLVER.INSTANCE_GAMMA, cfg.SOLVER.INSTANCE_TARGET)

    def __init__(self, gamma: float = 32.0, target: str = "image") -> None:
        super().__init__()
        if gamma <= 0:
            raise ConfigError(f"SOLVER.INSTANCE_GAMMA = {gamma} must be positive.")
        if target not in ("image", "layumi"):
            raise ConfigError(f"SOLVER.INSTANCE_TARGET = {target!r}: use 'image' or 'layumi'.")
        self.gamma, self.target = float(gamma), target

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.gamma * cosine_matrix(feats)
        if self.target == "image":
            target = torch.arange(logits.shape[0], device=logits.device)
        else:
            target = torch.unique(labels, return_inverse=True)[1]
        return F.cross_entropy(logits, target)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, target={self.target}"
