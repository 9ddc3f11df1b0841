"""Global pooling of the backbone's map: average (the paper's GAP) or generalised mean."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from strongreid.errors import ConfigError


class GlobalAvgPool(nn.Module):
    """B x C x H x W -> B x C mean (the paper's GAP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not x.mean((2, 3)): its backward hands the last conv an expanded, non-channels_last
        # gradient and convolution_backward falls onto a slow path (measured 3x slower
        # training step for ResNet-18 at 64x32 on the CPU, and 10x with bf16 + channels_last).
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class GeM(nn.Module):
    """Generalised mean pooling (Radenović et al.): (mean x^p)^(1/p); p=1 is GAP, p->inf max."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        if p <= 0:
            raise ConfigError(f"MODEL.GEM_P = {p} must be positive (3.0 is the usual choice).")
        self.p = float(p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x^p overflows / loses precision in bf16; pool in fp32 and hand back the input dtype.
        pooled = F.adaptive_avg_pool2d(x.float().clamp(min=self.eps).pow(self.p), 1).flatten(1).pow(1.0 / self.p)
        return pooled.to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LearnedGeM(nn.Module):
    """GeM whose p is a parameter trained with the network (fast-reid's GeneralizedMeanPoolingP);
    `p` is a 1-element tensor, as fast-reid stores it (`pool_layer.p`). B x C x H x W -> B x C x 1 x 1:
    fast-reid's heads reduce that map with a 1x1 conv next."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        if p <= 0:
            raise ConfigError(f"MODEL.GEM_P = {p} must be positive (3.0 is the usual choice).")
        self.p = nn.Parameter(torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.float()
        pooled = F.adaptive_avg_pool2d(x.float().clamp(min=self.eps).pow(p), 1).pow(1.0 / p)
        return pooled.to(x.dtype)


def build_pooling(kind: str, gem_p: float = 3.0) -> nn.Module:
    if kind == "avg":
        return GlobalAvgPool()
    if kind == "gem":
        return GeM(gem_p)
    raise ConfigError(f"MODEL.POOLING = {kind!r}: use 'avg' or 'gem'.")
