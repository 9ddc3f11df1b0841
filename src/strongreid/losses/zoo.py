"""Config -> loss modules for the loss zoo (MODEL.ID_LOSS_TYPE and the metric terms)."""

from __future__ import annotations

import torch.nn as nn
from yacs.config import CfgNode

from strongreid.losses.instance import InstanceLoss
from strongreid.losses.margin import (
    ArcFaceLogits,
    CircleSoftmaxLogits,
    CosFaceLogits,
    MarginIDLoss,
    SphereFaceLogits,
)
from strongreid.losses.pairwise import (
    CircleLoss,
    ContrastiveLoss,
    LiftedStructureLoss,
    MultiSimilarityTripletLoss,
    WeightedRegularizedTriplet,
)
from strongreid.losses.triplet import TripletLoss


def build_id_loss(cfg: CfgNode, ce: nn.Module) -> nn.Module:
    """`ce` itself for 'softmax'; otherwise the margin of MODEL.ID_LOSS_TYPE, then `ce`."""
    m = cfg.MODEL
    kind = m.ID_LOSS_TYPE
    if kind == "softmax":
        return ce
    margins = {
        "arcface": lambda: ArcFaceLogits(m.ARCFACE_SCALE, m.ARCFACE_MARGIN),
        "cosface": lambda: CosFaceLogits(m.COSFACE_SCALE, m.COSFACE_MARGIN),
        "sphereface": lambda: SphereFaceLogits(m.SPHEREFACE_SCALE, m.SPHEREFACE_MARGIN),
        "circle": lambda: CircleSoftmaxLogits(m.CIRCLE_SOFTMAX_SCALE, m.CIRCLE_SOFTMAX_MARGIN),
    }
    return MarginIDLoss(margins[kind](), ce)


def build_pair_term(cfg: CfgNode, name: str) -> nn.Module:
    """The metric term `name` of MODEL.METRIC_LOSS_TYPE with its SOLVER.* parameters."""
    s = cfg.SOLVER
    if name == "triplet":
        if s.TRIPLET_MINER == "multi_similarity":
            return MultiSimilarityTripletLoss(s.MARGIN, s.MS_MINER_EPSILON)
        return TripletLoss(s.MARGIN)
    builders = {
        "circle": lambda: CircleLoss(s.CIRCLE_MARGIN, s.CIRCLE_GAMMA, s.CIRCLE_REDUCTION),
        "contrastive": lambda: ContrastiveLoss(s.CONTRASTIVE_POS_MARGIN, s.CONTRASTIVE_NEG_MARGIN),
        "lifted": lambda: LiftedStructureLoss(s.LIFTED_POS_MARGIN, s.LIFTED_NEG_MARGIN),
        "instance": lambda: InstanceLoss(s.INSTANCE_GAMMA, s.INSTANCE_TARGET),
        "wrt": lambda: WeightedRegularizedTriplet(),
    }
    return builders[name]()
