"""Margin classifiers (ArcFace, CosFace, SphereFace, circle softmax) as ID losses.

The model's classifier is a `CosineClassifier` when MODEL.ID_LOSS_TYPE asks for a margin: it
owns the class weights and returns cos(theta) between the BNNeck feature and every class. These
modules add the margin to the target column, scale, and hand the logits to the (label-smoothing)
cross-entropy, so the classifier weights stay in the model (optimizer, checkpoint, DDP) and the
margin needs the labels only here.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from yacs.config import CfgNode

from strongreid.errors import ConfigError
from strongreid.losses.common import at_least_fp32
from strongreid.losses.registry import ID_LOSSES, LOSSES


def _one_hot(cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(cos, dtype=torch.bool).scatter_(1, targets.unsqueeze(1), True)


def _check_scale(key: str, scale: float) -> float:
    if scale <= 0:
        raise ConfigError(f"{key} = {scale} must be positive (the logit scale s).")
    return float(scale)


class MarginLogits(nn.Module):
    """Base: logits(cos, targets) -> the scaled logits that go into cross-entropy."""

    def logits(self, cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cos = at_least_fp32(cos).clamp(-1.0, 1.0)
        return self.logits(cos, targets)


@LOSSES.register("arcface")
@ID_LOSSES.register("arcface")
class ArcFaceLogits(MarginLogits):
    """ArcFace (Deng et al. 2019): s cos(theta_y + m) for the target, s cos(theta_j) elsewhere.

    Where theta_y + m would pass pi, cos(theta + m) stops decreasing; as insightface and
    fast-reid's ArcSoftmax we then use cos(theta) - m sin(m) (a CosFace-like penalty), which
    keeps the target logit monotonic in theta.
    """

    @classmethod
    def from_config(cls, cfg: CfgNode, ce: nn.Module) -> MarginIDLoss:
        """MODEL.ID_LOSS_TYPE 'arcface': MODEL.ARCFACE_SCALE / ARCFACE_MARGIN, then `ce`."""
        return MarginIDLoss(cls(cfg.MODEL.ARCFACE_SCALE, cfg.MODEL.ARCFACE_MARGIN), ce)

    def __init__(self, scale: float = 64.0, margin: float = 0.5) -> None:
        super().__init__()
        self.scale = _check_scale("MODEL.ARCFACE_SCALE", scale)
        if not 0.0 <= margin < math.pi / 2:
            raise ConfigError(f"MODEL.ARCFACE_MARGIN = {margin} must lie in [0, pi/2) radians.")
        self.margin = float(margin)
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(math.pi - margin)
        self.fallback = math.sin(math.pi - margin) * margin

    def logits(self, cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # clamp above 0: sqrt's derivative at 0 is infinite, and a cosine of exactly 1 would
        # turn the backward pass into NaN (changes sin by at most 1e-6 there).
        sin = (1.0 - cos.pow(2)).clamp(min=1e-12).sqrt()
        phi = cos * self.cos_m - sin * self.sin_m
        phi = torch.where(cos > self.threshold, phi, cos - self.fallback)
        return self.scale * torch.where(_one_hot(cos, targets), phi, cos)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}"


@LOSSES.register("cosface")
@ID_LOSSES.register("cosface")
class CosFaceLogits(MarginLogits):
    """CosFace / AM-softmax (Wang et al. 2018): s (cos(theta_y) - m) for the target."""

    @classmethod
    def from_config(cls, cfg: CfgNode, ce: nn.Module) -> MarginIDLoss:
        """MODEL.ID_LOSS_TYPE 'cosface': MODEL.COSFACE_SCALE / COSFACE_MARGIN, then `ce`."""
        return MarginIDLoss(cls(cfg.MODEL.COSFACE_SCALE, cfg.MODEL.COSFACE_MARGIN), ce)

    def __init__(self, scale: float = 64.0, margin: float = 0.35) -> None:
        super().__init__()
        self.scale = _check_scale("MODEL.COSFACE_SCALE", scale)
        if margin < 0:
            raise ConfigError(f"MODEL.COSFACE_MARGIN = {margin} must be >= 0.")
        self.margin = float(margin)

    def logits(self, cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.where(_one_hot(cos, targets), cos - self.margin, cos)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}"


@LOSSES.register("sphereface")
@ID_LOSSES.register("sphereface")
class SphereFaceLogits(MarginLogits):
    """SphereFace / A-softmax (Liu et al. 2017): s psi(theta_y) for the target, s cos elsewhere.

    psi(theta) = (-1)^k cos(m theta) - 2k on [k pi/m, (k+1) pi/m], with integer m. The paper
    multiplies by |x|; we use the normalised feature and a fixed scale s (the BNNeck feature's
    norm is set by its BN weights, not learned for the loss), which is the value
    pytorch-metric-learning's SphereFaceLoss gives for a feature of norm s and unit class weights.
    No lambda annealing (neither does pytorch-metric-learning, which layumi uses).
    """

    @classmethod
    def from_config(cls, cfg: CfgNode, ce: nn.Module) -> MarginIDLoss:
        """MODEL.ID_LOSS_TYPE 'sphereface': MODEL.SPHEREFACE_SCALE / SPHEREFACE_MARGIN, then `ce`."""
        return MarginIDLoss(cls(cfg.MODEL.SPHEREFACE_SCALE, cfg.MODEL.SPHEREFACE_MARGIN), ce)

    def __init__(self, scale: float = 30.0, margin: int = 4) -> None:
        super().__init__()
        self.scale = _check_scale("MODEL.SPHEREFACE_SCALE", scale)
        if int(margin) != margin or margin < 1:
            raise ConfigError(f"MODEL.SPHEREFACE_MARGIN = {margin} must be a positive integer (4 in the paper).")
        self.margin = int(margin)

    def logits(self, cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # acos has an infinite derivative at +-1: keep theta's gradient finite.
        theta = torch.acos(cos.clamp(-1.0 + 1e-7, 1.0 - 1e-7))
        k = torch.floor(theta * self.margin / math.pi)
        sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
        psi = sign * torch.cos(self.margin * theta) - 2.0 * k
        return self.scale * torch.where(_one_hot(cos, targets), psi, cos)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}"


@LOSSES.register("circle_softmax")
@ID_LOSSES.register("circle")
class CircleSoftmaxLogits(MarginLogits):
    """Circle loss in classification form (Sun et al. 2020; fast-reid's CircleSoftmax).

    Target: s a_p (cos - (1 - m)) with a_p = max(0, 1 + m - cos); others: s a_n (cos - m) with
    a_n = max(0, cos + m); the weights a_p, a_n are constants (detached), as in the paper.
    """

    @classmethod
    def from_config(cls, cfg: CfgNode, ce: nn.Module) -> MarginIDLoss:
        """MODEL.ID_LOSS_TYPE 'circle': MODEL.CIRCLE_SOFTMAX_SCALE / CIRCLE_SOFTMAX_MARGIN, then `ce`."""
        return MarginIDLoss(cls(cfg.MODEL.CIRCLE_SOFTMAX_SCALE, cfg.MODEL.CIRCLE_SOFTMAX_MARGIN), ce)

    def __init__(self, scale: float = 64.0, margin: float = 0.35) -> None:
        super().__init__()
        self.scale = _check_scale("MODEL.CIRCLE_SOFTMAX_SCALE", scale)
        if not 0.0 <= margin < 1.0:
            raise ConfigError(f"MODEL.CIRCLE_SOFTMAX_MARGIN = {margin} must lie in [0, 1).")
        self.margin = float(margin)

    def logits(self, cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        m = self.margin
        alpha_p = (1.0 + m - cos.detach()).clamp(min=0.0)
        alpha_n = (cos.detach() + m).clamp(min=0.0)
        s_p = alpha_p * (cos - (1.0 - m))
        s_n = alpha_n * (cos - m)
        return self.scale * torch.where(_one_hot(cos, targets), s_p, s_n)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}"


class MarginIDLoss(nn.Module):
    """The ID loss of a margin classifier: cross-entropy (or its label-smoothing form) of the
    margin logits; `logits` here are the cosine classifier's cos(theta)."""

    def __init__(self, margin: MarginLogits, ce: nn.Module) -> None:
        super().__init__()
        self.margin = margin
        self.ce = ce

    def forward(self, cos: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.ce(self.margin(cos, targets), targets)
