"""Cluster-contrast's memory: one normalised centroid per pseudo-identity, an InfoNCE loss.

Dai et al., "Cluster Contrast for Unsupervised Person Re-Identification" (2021): the logits of
an image are its cosine similarities to every cluster centroid over a temperature, trained with
cross-entropy towards its own cluster; after the gradient is taken, each image moves its
cluster's centroid, c <- m c + (1 - m) x, renormalised, one image after another in batch order.
The memory is rebuilt from the cluster means each time the data is re-clustered.

As the metric term 'cluster_memory' of MODEL.METRIC_LOSS_TYPE it starts empty: the
re-clustering of ADAPT.ENABLED (strongreid.adapt) fills it before every epoch. The ADAPT.* keys
are checked here, the lowest part that reads them, so that every validated config sees them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from strongreid.config import flag
from strongreid.config.components import check_at_least, check_choices, config_check
from strongreid.errors import ConfigError, StrongReIDError
from strongreid.losses.common import at_least_fp32
from strongreid.losses.registry import LOSSES, PAIR_LOSSES

# ADAPT.TRACKLETS: 'off' never reads a training pid; 'must_link' keeps (pid, camid) groups whole.
TRACKLET_MODES = ("off", "must_link")


@LOSSES.register("cluster_memory")
@PAIR_LOSSES.register("cluster_memory")
class ClusterMemory(nn.Module):
    """InfoNCE over cluster centroids (temperature `temp`), centroids updated with `momentum`.

    `centroids` None: an empty memory that `reset` fills (the metric term of ADAPT.ENABLED).
    """

    weight_key = "SOLVER.CLUSTER_MEMORY_LOSS_WEIGHT"

    @classmethod
    def from_config(cls, cfg: CfgNode) -> ClusterMemory:
        return cls(None, temp=cfg.ADAPT.TEMP, momentum=cfg.ADAPT.MOMENTUM)

    @staticmethod
    def check(cfg: CfgNode) -> None:
        """Its targets are cluster ids, so only the re-clustering of ADAPT.ENABLED can feed it."""
        if not flag(cfg.ADAPT.ENABLED):
            raise ConfigError(
                "MODEL.METRIC_LOSS_TYPE 'cluster_memory' trains against pseudo-identities: set "
                "ADAPT.ENABLED True (configs/adapt_night.yml), or use another metric term."
            )

    def __init__(self, centroids: torch.Tensor | None = None, temp: float = 0.05,
                 momentum: float = 0.2) -> None:
        super().__init__()
        if not temp > 0:
            raise ConfigError(f"cluster memory temperature must be > 0, got {temp!r}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"cluster memory momentum must be in [0, 1), got {momentum!r}")
        self.temp = float(temp)
        self.momentum = float(momentum)
        # Not part of a checkpoint: its size changes with every clustering, which rebuilds it.
        self.register_buffer("features", torch.zeros(0, 0), persistent=False)
        if centroids is not None:
            self.reset(centroids)

    @staticmethod
    def centroids(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The normalised mean feature of each cluster 0..C-1 (rows labelled -1 are ignored)."""
        keep = labels >= 0
        feats, labels = F.normalize(feats[keep].float(), dim=1), labels[keep].long()
        count = int(labels.max()) + 1 if labels.numel() else 0
        sums = torch.zeros(count, feats.shape[1], dtype=torch.float32).index_add_(0, labels, feats)
        sizes = torch.bincount(labels, minlength=count).clamp_min(1).unsqueeze(1)
        return sums / sizes

    def reset(self, centroids: torch.Tensor) -> None:
        """Replace the memory by these centroids (one row per cluster), normalised."""
        if centroids.dim() != 2 or centroids.shape[0] < 1:
            raise ConfigError(
                f"the cluster memory needs at least one centroid (got shape {tuple(centroids.shape)}): "
                "the clustering found no identity; raise ADAPT.EPS or lower ADAPT.MIN_SAMPLES"
            )
        device = self.features.device
        self.features = F.normalize(centroids.detach().float(), dim=1).to(device)

    @classmethod
    def from_labels(cls, feats: torch.Tensor, labels: torch.Tensor, **kwargs) -> ClusterMemory:
        """Centroids = the normalised mean feature of each cluster 0..C-1 (-1 rows ignored)."""
        return cls(cls.centroids(feats, labels), **kwargs)

    def forward(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.features.shape[0] == 0:
            raise StrongReIDError(
                "the cluster memory is empty: it is filled by the re-clustering of ADAPT.ENABLED "
                "before each epoch (or by reset(centroids) when used on its own)"
            )
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

    def extra_repr(self) -> str:
        return f"clusters={self.features.shape[0]}, temp={self.temp}, momentum={self.momentum}"



def metric_terms(cfg: CfgNode) -> list[str]:
    """The words of MODEL.METRIC_LOSS_TYPE ('cluster_memory,triplet' -> two)."""
    return [t.strip().lower() for t in str(cfg.MODEL.METRIC_LOSS_TYPE).replace("+", ",").split(",")
            if t.strip()]


@config_check("adapt")
def check_adapt_keys(cfg: CfgNode) -> None:
    """ADAPT.* values, and with ADAPT.ENABLED the loader, loss and test feature it trains with."""
    a = cfg.ADAPT
    check_choices(cfg, {"ADAPT.TRACKLETS": TRACKLET_MODES})
    for key in ("ENABLED", "RESET_BN", "CAMERA_CENTER"):
        if not isinstance(a[key], bool):
            raise ConfigError(f"ADAPT.{key} = {a[key]!r} must be True or False.")
    if not float(a.EPS) > 0:
        raise ConfigError(f"ADAPT.EPS = {a.EPS} must be > 0 (the DBSCAN radius on the Jaccard "
                          "distance, which lies in [0, 1]; cluster-contrast uses 0.6).")
    check_at_least(cfg, ("ADAPT.MIN_SAMPLES", "ADAPT.K1", "ADAPT.K2", "ADAPT.ITERS"))
    if a.K2 > a.K1:
        raise ConfigError(f"ADAPT.K2 = {a.K2} must not exceed ADAPT.K1 = {a.K1} (the query "
                          "expansion runs over the k1 neighbourhood; e.g. K1 30, K2 6).")
    if not float(a.TEMP) > 0:
        raise ConfigError(f"ADAPT.TEMP = {a.TEMP} must be > 0 (cluster-contrast uses 0.05).")
    if not 0.0 <= float(a.MOMENTUM) < 1.0:
        raise ConfigError(f"ADAPT.MOMENTUM = {a.MOMENTUM} must be in [0, 1) (cluster-contrast uses 0.2).")
    if not a.ENABLED:
        return
    if "cluster_memory" not in metric_terms(cfg):
        raise ConfigError(
            f"ADAPT.ENABLED trains against the cluster memory: MODEL.METRIC_LOSS_TYPE = "
            f"{cfg.MODEL.METRIC_LOSS_TYPE!r} must name 'cluster_memory' (e.g. 'cluster_memory')."
        )
    if cfg.DATALOADER.SAMPLER != "triplet":
        raise ConfigError(
            f"ADAPT.ENABLED: DATALOADER.SAMPLER = {cfg.DATALOADER.SAMPLER!r} must be 'triplet' "
            "(P x K batches over the pseudo-identities, no ID classifier: their number changes "
            "with every clustering)."
        )
    if flag(cfg.MODEL.IF_WITH_CENTER):
        raise ConfigError("ADAPT.ENABLED: set MODEL.IF_WITH_CENTER 'no' (center loss keeps one "
                          "center per identity, and the pseudo-identities change every epoch).")
    if cfg.DATASETS.VALIDATION != "off":
        raise ConfigError("ADAPT.ENABLED: set DATASETS.VALIDATION 'off' (a validation split holds "
                          "out images of labelled training identities, and there are none).")
    if cfg.MODEL.HEAD == "baseline" and cfg.MODEL.NECK == "bnneck" and cfg.TEST.NECK_FEAT != cfg.MODEL.METRIC_FEAT:
        raise ConfigError(
            f"ADAPT.ENABLED: the memory trains the feature {cfg.MODEL.METRIC_FEAT!r} the BNNeck "
            f"(MODEL.METRIC_FEAT) and its centroids are the clustered test features, so set "
            f"TEST.NECK_FEAT {cfg.MODEL.METRIC_FEAT!r} too (or MODEL.METRIC_FEAT {cfg.TEST.NECK_FEAT!r})."
        )
