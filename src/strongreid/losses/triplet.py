"""Batch-hard triplet loss (Hermans et al. 2017) on unnormalised Euclidean distances."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from strongreid.losses.common import at_least_fp32
from strongreid.losses.registry import LOSSES, PAIR_LOSSES, TRIPLET_MINERS


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """D_ij = sqrt(max(|x_i|^2 + |y_j|^2 - 2 x_i.y_j, 1e-12)), the original's clamped form.

    The clamp sits before the sqrt, so equal vectors get distance 1e-6 and no gradient (the
    sqrt's derivative at 0 would be infinite).
    """
    xx = x.pow(2).sum(dim=1, keepdim=True)
    yy = y.pow(2).sum(dim=1, keepdim=True).t()
    d2 = xx + yy - 2.0 * (x @ y.t())
    return d2.clamp(min=1e-12).sqrt()


def hard_example_mining(
    dist: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hardest positive and negative distance of every anchor, and which anchors have a negative.

    Positives include the anchor itself (as in the original). Masked max/min instead of the
    original's reshape, so identities may have different numbers of images in a batch.
    """
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    d_ap = dist.masked_fill(~same, float("-inf")).amax(dim=1)
    d_an = dist.masked_fill(same, float("inf")).amin(dim=1)
    has_negative = (~same).any(dim=1)
    return d_ap, d_an, has_negative


@LOSSES.register("triplet")
@PAIR_LOSSES.register("triplet")
@TRIPLET_MINERS.register("batch_hard")
class TripletLoss(nn.Module):
    """mean_i max(0, d_ap - d_an + margin), or the soft margin log(1 + exp(d_ap - d_an)).

    `margin=None` selects the soft margin (SOLVER.MARGIN None). Anchors without any negative in
    the batch (a batch of one identity) are left out; with none left the loss is 0.
    """

    weight_key = "SOLVER.TRIPLET_LOSS_WEIGHT"

    @classmethod
    def from_config(cls, cfg: CfgNode) -> nn.Module:
        """The 'triplet' term with the miner of SOLVER.TRIPLET_MINER (this class: batch-hard)."""
        miner = TRIPLET_MINERS.get(cfg.SOLVER.TRIPLET_MINER)
        return cls(cfg.SOLVER.MARGIN) if miner is cls else miner.from_config(cfg)

    def __init__(self, margin: float | None = 0.3) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        feats = at_least_fp32(feats)
        dist = euclidean_dist(feats, feats)
        d_ap, d_an, valid = hard_example_mining(dist, labels)
        if not bool(valid.any()):
            return feats.sum() * 0.0  # keeps the graph (and DDP) intact
        d_ap, d_an = d_ap[valid], d_an[valid]
        if self.margin is None:
            return F.softplus(d_ap - d_an).mean()
        return F.relu(d_ap - d_an + self.margin).mean()

    def extra_repr(self) -> str:
        return "soft margin" if self.margin is None else f"margin={self.margin}"
