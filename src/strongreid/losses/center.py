"""Center loss (Wen et al. 2016) as the original uses it."""

from __future__ import annotations

import torch
import torch.nn as nn

from strongreid.losses.common import at_least_fp32
from strongreid.losses.registry import LOSSES


@LOSSES.register("center")
class CenterLoss(nn.Module):
    """(1/B) sum_i clamp(|x_i - c_{y_i}|^2, 1e-12, 1e12) + (C - 1) * 1e-12.

    The original builds the B x C distance matrix, masks it with the one-hot labels and clamps
    every entry to [1e-12, 1e12] before summing, so each of the B(C-1) masked zeros adds 1e-12
    (divided by B: the constant term). We compute only the B needed distances and add that
    constant, which gives the same value and the same gradient. No 1/2 factor, no sqrt.
    Centers start N(0, 1) on `device`; the trainer moves them with the loss module.
    """

    def __init__(
        self, num_classes: int, feat_dim: int, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.feat_dim = int(feat_dim)
        self.centers = nn.Parameter(torch.randn(self.num_classes, self.feat_dim, device=device))

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        feats = at_least_fp32(feats)
        diff = feats - self.centers[labels]
        dist = diff.pow(2).sum(dim=1).clamp(min=1e-12, max=1e12)
        return dist.sum() / feats.shape[0] + (self.num_classes - 1) * 1e-12

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, feat_dim={self.feat_dim}"
