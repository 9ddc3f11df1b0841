"""Pair-based metric losses on a batch of features: circle, contrastive, generalised lifted
structure, triplet with a multi-similarity miner, and the weighted regularised triplet (AGW).

Every loss takes (feats, labels) like TripletLoss, so the trainer can hand it the features of
all ranks (SOLVER.TRIPLET_GATHER). The normalising ones (circle, contrastive, lifted,
multi-similarity triplet) compare L2-normalised features, as pytorch-metric-learning (what layumi
uses) does; the WRT works on raw Euclidean distances, as AGW. All compute in at least fp32.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from strongreid.errors import ConfigError
from strongreid.losses.common import at_least_fp32
from strongreid.losses.registry import LOSSES, PAIR_LOSSES, TRIPLET_MINERS
from strongreid.losses.triplet import euclidean_dist


def pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) B x B masks; an image is not its own positive."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def cosine_matrix(feats: torch.Tensor) -> torch.Tensor:
    x = F.normalize(at_least_fp32(feats), dim=1)
    return x @ x.t()


def normalized_dist(feats: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of L2-normalised features, 0 on the diagonal (no sqrt(0) gradient)."""
    x = F.normalize(at_least_fp32(feats), dim=1)
    d2 = (2.0 - 2.0 * (x @ x.t())).clamp(min=0.0)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    # sqrt only where d2 > 0: coincident features get distance 0 and zero gradient.
    safe = torch.where(d2 > 0, d2, torch.ones_like(d2))
    return torch.where((d2 > 0) & ~eye, safe.sqrt(), torch.zeros_like(d2))


def masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log sum exp over the masked entries; 0 for a row without any."""
    out = torch.logsumexp(x.masked_fill(~mask, float("-inf")), dim=1)
    return torch.where(mask.any(dim=1), out, torch.zeros_like(out))


def mean_nonzero(losses: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries (pytorch-metric-learning's AvgNonZeroReducer); 0, still in
    the graph of `anchor`, when none is positive."""
    keep = losses > 0
    if not bool(keep.any()):
        return anchor.sum() * 0.0
    return losses[keep].mean()


@LOSSES.register("circle")
@PAIR_LOSSES.register("circle")
class CircleLoss(nn.Module):
    """Pair-wise circle loss (Sun et al. 2020) on cosine similarities.

    Per anchor: softplus(logsumexp_n(g a_n (s_n - m)) + logsumexp_p(-g a_p (s_p - 1 + m))),
    a_p = max(0, 1 + m - s_p), a_n = max(0, s_n + m) detached. reduction 'anchor': the mean over
    anchors with a positive and a negative (the paper, pytorch-metric-learning, fast-reid);
    'batch': layumi's form, all upper-triangle pairs of the batch pooled in one such term and
    divided by the batch size (its train.py divides by now_batch_size).
    """

    weight_key = "SOLVER.CIRCLE_LOSS_WEIGHT"

    @classmethod
    def from_config(cls, cfg: CfgNode) -> CircleLoss:
        s = cfg.SOLVER
        return cls(s.CIRCLE_MARGIN, s.CIRCLE_GAMMA, s.CIRCLE_REDUCTION)

    def __init__(self, margin: float = 0.25, gamma: float = 32.0, reduction: str = "anchor") -> None:
        super().__init__()
        if not 0.0 <= margin < 1.0:
            raise ConfigError(f"SOLVER.CIRCLE_MARGIN = {margin} must lie in [0, 1).")
        if gamma <= 0:
            raise ConfigError(f"SOLVER.CIRCLE_GAMMA = {gamma} must be positive.")
        if reduction not in ("anchor", "batch"):
            raise ConfigError(f"SOLVER.CIRCLE_REDUCTION = {reduction!r}: use 'anchor' or 'batch'.")
        self.margin, self.gamma, self.reduction = float(margin), float(gamma), reduction

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sim = cosine_matrix(feats)
        pos, neg = pair_masks(labels)
        m = self.margin
        logit_p = -self.gamma * (1.0 + m - sim.detach()).clamp(min=0.0) * (sim - (1.0 - m))
        logit_n = self.gamma * (sim.detach() + m).clamp(min=0.0) * (sim - m)
        if self.reduction == "batch":
            pos_u, neg_u = pos.triu(1), neg.triu(1)
            if not bool(pos_u.any()) or not bool(neg_u.any()):
                return sim.sum() * 0.0
            total = torch.logsumexp(logit_p[pos_u], 0) + torch.logsumexp(logit_n[neg_u], 0)
            return F.softplus(total) / feats.shape[0]
        valid = pos.any(dim=1) & neg.any(dim=1)
        if not bool(valid.any()):
            return sim.sum() * 0.0
        per_anchor = F.softplus(masked_logsumexp(logit_p, pos) + masked_logsumexp(logit_n, neg))
        return per_anchor[valid].mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, gamma={self.gamma}, reduction={self.reduction}"


@LOSSES.register("contrastive")
@PAIR_LOSSES.register("contrastive")
class ContrastiveLoss(nn.Module):
    """Contrastive loss (Hadsell et al. 2006) on normalised Euclidean distances, every ordered
    pair: mean_nonzero(max(0, d_p - m_pos)) + mean_nonzero(max(0, m_neg - d_n)), the two means
    over the pairs with a non-zero loss (pytorch-metric-learning's ContrastiveLoss)."""

    weight_key = "SOLVER.CONTRASTIVE_LOSS_WEIGHT"

    @classmethod
    def from_config(cls, cfg: CfgNode) -> ContrastiveLoss:
        return cls(cfg.SOLVER.CONTRASTIVE_POS_MARGIN, cfg.SOLVER.CONTRASTIVE_NEG_MARGIN)

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0) -> None:
        super().__init__()
        if pos_margin < 0 or neg_margin <= pos_margin:
            raise ConfigError(
                f"SOLVER.CONTRASTIVE_POS_MARGIN = {pos_margin}, SOLVER.CONTRASTIVE_NEG_MARGIN = "
                f"{neg_margin}: need 0 <= POS_MARGIN < NEG_MARGIN (distances of unit vectors lie in [0, 2])."
            )
        self.pos_margin, self.neg_margin = float(pos_margin), float(neg_margin)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = normalized_dist(feats)
        pos, neg = pair_masks(labels)
        pos_loss = mean_nonzero(F.relu(dist[pos] - self.pos_margin), dist)
        neg_loss = mean_nonzero(F.relu(self.neg_margin - dist[neg]), dist)
        return pos_loss + neg_loss

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}"


@LOSSES.register("lifted")
@PAIR_LOSSES.register("lifted")
class LiftedStructureLoss(nn.Module):
    """Generalised lifted structure loss (Hermans et al. 2017, the form layumi trains through
    pytorch-metric-learning): mean over anchors of
    max(0, logsumexp_p(d_p - m_pos) + logsumexp_n(m_neg - d_n)), normalised distances."""

    weight_key = "SOLVER.LIFTED_LOSS_WEIGHT"

    @classmethod
    def from_config(cls, cfg: CfgNode) -> LiftedStructureLoss:
        return cls(cfg.SOLVER.LIFTED_POS_MARGIN, cfg.SOLVER.LIFTED_NEG_MARGIN)

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0) -> None:
        super().__init__()
        if pos_margin < 0 or neg_margin <= pos_margin:
            raise ConfigError(
                f"SOLVER.LIFTED_POS_MARGIN = {pos_margin}, SOLVER.LIFTED_NEG_MARGIN = {neg_margin}: "
                "need 0 <= POS_MARGIN < NEG_MARGIN."
            )
        self.pos_margin, self.neg_margin = float(pos_margin), float(neg_margin)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = normalized_dist(feats)
        pos, neg = pair_masks(labels)
        per_anchor = masked_logsumexp(dist - self.pos_margin, pos) + masked_logsumexp(self.neg_margin - dist, neg)
        return F.relu(per_anchor).mean()

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}"


def multi_similarity_mine(sim: torch.Tensor, labels: torch.Tensor,
                          epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Wang et al. 2019's pair miner (pytorch-metric-learning's MultiSimilarityMiner): keep a
    positive when s_ap - eps < the anchor's largest negative similarity, a negative when
    s_an + eps > its smallest positive similarity. Returns the kept (positive, negative) masks."""
    pos, neg = pair_masks(labels)
    max_neg = sim.masked_fill(~neg, float("-inf")).amax(dim=1, keepdim=True)
    min_pos = sim.masked_fill(~pos, float("inf")).amin(dim=1, keepdim=True)
    return pos & (sim - epsilon < max_neg), neg & (sim + epsilon > min_pos)


@LOSSES.register("triplet_ms")
@TRIPLET_MINERS.register("multi_similarity")
class MultiSimilarityTripletLoss(nn.Module):
    """Triplet margin loss on the triplets of multi-similarity-mined pairs (layumi's --triplet:
    pytorch-metric-learning's TripletMarginLoss(0.3) with MultiSimilarityMiner(0.1)).

    Triplets: every mined positive (a, p) with every mined negative (a, n) of the same anchor.
    Loss max(0, d_ap - d_an + margin) on normalised distances, mean over the non-zero ones;
    margin None: softplus(d_ap - d_an), the mean over all of them. Mining runs on detached
    cosine similarities (it selects; it is not differentiated).
    """

    @classmethod
    def from_config(cls, cfg: CfgNode) -> MultiSimilarityTripletLoss:
        return cls(cfg.SOLVER.MARGIN, cfg.SOLVER.MS_MINER_EPSILON)

    def __init__(self, margin: float | None = 0.3, epsilon: float = 0.1) -> None:
        super().__init__()
        if epsilon < 0:
            raise ConfigError(f"SOLVER.MS_MINER_EPSILON = {epsilon} must be >= 0.")
        self.margin, self.epsilon = margin, float(epsilon)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = normalized_dist(feats)
        with torch.no_grad():
            keep_pos, keep_neg = multi_similarity_mine(cosine_matrix(feats.detach()), labels, self.epsilon)
        # B x B x B: triplet (a, p, n) exists when (a, p) and (a, n) were both mined.
        triplets = keep_pos.unsqueeze(2) & keep_neg.unsqueeze(1)
        if not bool(triplets.any()):
            return dist.sum() * 0.0
        a, p, n = triplets.nonzero(as_tuple=True)
        diff = dist[a, p] - dist[a, n]
        if self.margin is None:
            return F.softplus(diff).mean()
        return mean_nonzero(F.relu(diff + self.margin), dist)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, epsilon={self.epsilon}"


def softmax_weights(dist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """exp(d) / sum exp(d) over the masked entries of each row (AGW's weighting)."""
    d = dist.masked_fill(~mask, float("-inf"))
    w = torch.softmax(d, dim=1)
    return torch.where(mask.any(dim=1, keepdim=True), w, torch.zeros_like(w)).nan_to_num(0.0)


@LOSSES.register("wrt")
@PAIR_LOSSES.register("wrt")
class WeightedRegularizedTriplet(nn.Module):
    """Weighted regularised triplet (Ye et al. 2021, AGW): softplus(d_p - d_n), mean over
    anchors, where d_p = sum_p softmax(d_ap) d_ap and d_n = sum_n softmax(-d_an) d_an on raw
    Euclidean distances. No margin to tune; positives include the anchor itself, as in AGW."""

    weight_key = "SOLVER.WRT_LOSS_WEIGHT"

    @classmethod
    def from_config(cls, cfg: CfgNode) -> WeightedRegularizedTriplet:
        return cls()

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        feats = at_least_fp32(feats)
        dist = euclidean_dist(feats, feats)
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        valid = (~same).any(dim=1)
        if not bool(valid.any()):
            return feats.sum() * 0.0
        furthest = (softmax_weights(dist, same) * dist).sum(dim=1)
        closest = (softmax_weights(-dist, ~same) * dist).sum(dim=1)
        return F.softplus(furthest - closest)[valid].mean()
