"""Cluster-contrast's memory: one normalised centroid per pseudo-identity, an InfoNCE loss.

Dai et al., "Cluster Contrast for Unsupervised Person Re-Identification" (2021): the logits of
an image are its cosine similarities to every cluster centroid over a temperature, trained with
cross-entropy towards its own cluster; after the gradient is taken, each image moves its
cluster's centroid, c <- m c + (1 - m) x, renormalised, one image after another in batch order.
The memory is rebuilt from the cluster means each time the data is re-clustered.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from strongreid.errors import ConfigError
from strongreid.losses.common import at_least_fp32


class ClusterMemory(nn.Module):
    """InfoNCE over cluster centroids (temperature `temp`), centroids updated with `momentum`."""

    def __init__(self, centroids: torch.Tensor, temp: float = 0.05, momentum: float = 0.2) -> None:
        super().__init__()
        if centroids.dim() != 2 or centroids.shape[0] < 1:
            raise ConfigError(
                f"the cluster memory needs at least one centroid (got shape {tuple(centroids.shape)}): "
                "the clustering found no identity; lower the DBSCAN eps or min_samples"
            )
        if not temp > 0:
            raise ConfigError(f"cluster memory temperature must be > 0, got {temp!r}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"cluster memory momentum must be in [0, 1), got {momentum!r}")
        self.temp = float(temp)
        self.momentum = float(momentum)
        self.register_buffer("features", F.normalize(centroids.detach().float(), dim=1))

    @classmethod
    def from_labels(cls, feats: torch.Tensor, labels: torch.Tensor, **kwargs) -> ClusterMemory:
        """Centroids = the normalised mean feature of each cluster 0..C-1 (-1 rows ignored)."""
        keep = labels >= 0
        feats, labels = F.normalize(feats[keep].float(), dim=1), labels[keep].long()
        count = int(labels.max()) + 1 if labels.numel() else 0
        sums = torch.zeros(count, feats.shape[1], dtype=torch.float32).index_add_(0, labels, feats)
        sizes = torch.bincount(labels, minlength=count).clamp_min(1).unsqueeze(1)
        return cls(sums / sizes, **kwargs)

    def forward(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = F.normalize(at_least_fp32(feats), dim=1)
        # The loss sees the memory before this batch moves it (a copy keeps autograd's saved
        # operand intact while the buffer is updated in place below).
        logits = x @ self.features.clone().t() / self.temp
        loss = F.cross_entropy(logits, targets)
        if self.training:
            self._update(x.detach(), targets)
        return loss

    @torch.no_grad()
    def _update(self, x: torch.Tensor, targets: torch.Tensor) -> None:
        m = self.momentum
        for xi, y in zip(x, targets.tolist()):
            c = self.features[y] * m + xi * (1.0 - m)
            self.features[y] = c / c.norm()
