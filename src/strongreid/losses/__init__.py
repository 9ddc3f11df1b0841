"""Losses: the registries of ID losses and metric terms, and `build_loss` for the strong baseline's combinations."""

from strongreid.losses.build import ReIDLoss, build_loss
from strongreid.losses.center import CenterLoss
from strongreid.losses.classification import CrossEntropyLabelSmooth, CrossEntropyLoss
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
from strongreid.losses.registry import ID_LOSSES, LOSSES, PAIR_LOSSES, TRIPLET_MINERS
from strongreid.losses.triplet import TripletLoss, euclidean_dist, hard_example_mining

__all__ = [
    "ID_LOSSES",
    "LOSSES",
    "PAIR_LOSSES",
    "TRIPLET_MINERS",
    "ArcFaceLogits",
    "CircleLoss",
    "CircleSoftmaxLogits",
    "ContrastiveLoss",
    "CosFaceLogits",
    "InstanceLoss",
    "LiftedStructureLoss",
    "MarginIDLoss",
    "MultiSimilarityTripletLoss",
    "SphereFaceLogits",
    "WeightedRegularizedTriplet",
    "CenterLoss",
    "CrossEntropyLabelSmooth",
    "CrossEntropyLoss",
    "ReIDLoss",
    "TripletLoss",
    "build_loss",
    "euclidean_dist",
    "hard_example_mining",
]
