"""The hook that turns unlabelled training images into pseudo-identities before every epoch."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn
from yacs.config import CfgNode

from strongreid.adapt.clustering import pseudo_labels
from strongreid.data import build_test_loader, build_train_loader
from strongreid.data.datasets import ImageRecord
from strongreid.engine.hooks import HookBase
from strongreid.engine.inference import extract_split
from strongreid.errors import ConfigError, StrongReIDError
from strongreid.losses.cluster_memory import ClusterMemory

logger = logging.getLogger("strongreid")


class PseudoLabelHook(HookBase):
    """Before each epoch: test features of every training image -> `pseudo_labels` -> the
    cluster memory starts from the cluster centroids, and the epoch's P x K batches are drawn
    over the clusters alone (DBSCAN's outliers sit the epoch out).

    `records`: the training images (their pids are never read); `must_link`: one tracklet id
    per image (ADAPT.TRACKLETS 'must_link': tracklets are clustered as wholes, by their mean
    feature, and ADAPT.MIN_SAMPLES counts tracklets) or None. Publishes a `{"type": "cluster"}` row.
    A resumed run needs no state: the clustering is computed again from the restored weights.
    The features are the test features of one view (no TEST.FLIP_AUG mirror: the clustering
    needs neighbours, and one view halves its cost).
    """

    # Before the progress logger (20) reads the epoch's length.
    priority = 5

    def __init__(self, records: Sequence[ImageRecord], must_link: np.ndarray | None = None) -> None:
        self.records = list(records)
        self.must_link = must_link
        self.labels: np.ndarray | None = None

    def before_train(self) -> None:
        t = self.trainer
        if t.resumed or not t.cfg.ADAPT.RESET_BN:
            return  # a resumed run's checkpoint holds the statistics already
        # AdaBN (Li et al. 2016): the source model's BN statistics describe the source domain;
        # recomputed on the target images, the first clustering sees features of the new one.
        start = time.perf_counter()
        loader = build_test_loader(_one_view(t.cfg), self.records)
        update_bn((images for images, *_ in loader), t.model, device=t.device)
        logger.info("BN statistics recomputed on the %d training images (ADAPT.RESET_BN), %.1f s",
                    len(self.records), time.perf_counter() - start)

    def before_epoch(self) -> None:
        t = self.trainer
        start = time.perf_counter()
        feats = extract_split(_one_view(t.cfg), t.model, self.records, t.device)
        if feats is None:
            raise StrongReIDError("adaptation runs in one process; start it without torchrun")
        feats = F.normalize(feats.float().cpu(), dim=1)
        labels = self._cluster(feats)
        self.labels = labels
        clusters = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
        outliers = int((labels < 0).sum())
        p = t.cfg.SOLVER.IMS_PER_BATCH // t.cfg.DATALOADER.NUM_INSTANCE
        if clusters < p:
            raise ConfigError(
                f"epoch {t.epoch}: the clustering found {clusters} pseudo-identities ({outliers} of "
                f"{len(labels)} images left out as outliers), fewer than the {p} a batch needs "
                "(SOLVER.IMS_PER_BATCH / DATALOADER.NUM_INSTANCE): raise ADAPT.EPS, lower "
                "ADAPT.MIN_SAMPLES, or start from a model trained on labelled data (MODEL.PRETRAIN_PATH)."
            )
        memory_term(t.loss_fn).reset(ClusterMemory.centroids(feats, torch.from_numpy(labels)))
        kept = [ImageRecord(r.path, int(label), r.camid) for r, label in zip(self.records, labels)
                if label >= 0]
        t.loader.reset(build_train_loader(t.cfg, kept, device=t.device), kept, t.epoch)
        t.iters_per_epoch = len(t.loader)
        row = {"type": "cluster", "epoch": t.epoch, "clusters": clusters, "outliers": outliers,
               "images": len(labels), "time": time.perf_counter() - start}
        logger.info("epoch %d clustering: %d pseudo-identities, %d of %d images left out, %.1f s",
                    t.epoch, clusters, outliers, len(labels), row["time"])
        t.publish(row)

    def _cluster(self, feats: torch.Tensor) -> np.ndarray:
        a = self.trainer.cfg.ADAPT
        options = {"eps": a.EPS, "min_samples": a.MIN_SAMPLES, "k1": a.K1, "k2": a.K2}
        if a.CAMERA_CENTER:
            feats = camera_centred(feats, np.asarray([r.camid for r in self.records]))
        if self.must_link is None:
            return pseudo_labels(feats.numpy(), **options)
        # A tracklet is one point (its mean feature): never split, and it counts once towards
        # DBSCAN's density, however many crops it has (linking its crops at distance 0 instead
        # makes every crop of a long tracklet a core point and chains unrelated people).
        means, inverse = tracklet_means(feats, self.must_link)
        return pseudo_labels(means.numpy(), **options)[inverse]


def camera_centred(feats: torch.Tensor, cameras: np.ndarray) -> torch.Tensor:
    """Each row minus the mean feature of its camera's rows, L2-normalised again.

    On the night set, half of an image's ten nearest neighbours came from its own camera under
    the street model: the camera's look outweighed the person's. Clustering these features
    instead took adaptation with tracklets from 10.5 to 27.1 mAP (docs/adaptation.md).
    """
    out = feats.clone()
    for camera in np.unique(cameras):
        rows = torch.from_numpy(cameras == camera)
        out[rows] -= feats[rows].mean(0)
    return F.normalize(out, dim=1)


def tracklet_means(feats: torch.Tensor, groups: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The normalised mean feature of each group, and each row's group index into them."""
    _, inverse = np.unique(groups, return_inverse=True)
    index = torch.from_numpy(inverse.astype(np.int64))
    sums = torch.zeros(int(index.max()) + 1, feats.shape[1]).index_add_(0, index, feats)
    return F.normalize(sums, dim=1), inverse


def _one_view(cfg: CfgNode) -> CfgNode:
    one = cfg.clone()
    one.defrost()
    one.TEST.FLIP_AUG = False
    one.TEST.MULTI_SCALE = [1.0]
    one.freeze()
    return one


def memory_term(loss_fn: Any) -> ClusterMemory:
    """The loss's 'cluster_memory' term (the config check makes sure there is one)."""
    metrics = getattr(loss_fn, "metrics", {})
    term = metrics["cluster_memory"] if "cluster_memory" in metrics else None
    if not isinstance(term, ClusterMemory):
        raise ConfigError("ADAPT.ENABLED needs MODEL.METRIC_LOSS_TYPE 'cluster_memory'")
    return term
