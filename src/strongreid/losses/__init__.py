"""Losses: a registry of modules and `build_loss` for the strong baseline's combinations."""

from strongreid.losses.build import ReIDLoss, build_loss
from strongreid.losses.center import CenterLoss
from strongreid.losses.classification import CrossEntropyLabelSmooth, CrossEntropyLoss
from strongreid.losses.registry import LOSSES
from strongreid.losses.triplet import TripletLoss, euclidean_dist, hard_example_mining

__all__ = [
    "LOSSES",
    "CenterLoss",
    "CrossEntropyLabelSmooth",
    "CrossEntropyLoss",
    "ReIDLoss",
    "TripletLoss",
    "build_loss",
    "euclidean_dist",
    "hard_example_mining",
]
