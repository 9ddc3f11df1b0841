"""Training without the training split's identity labels (ADAPT.ENABLED)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from strongreid.adapt.hooks import PseudoLabelHook
from strongreid.adapt.loader import PseudoIdentityLoader
from strongreid.data.datasets import ImageRecord
from strongreid.data.integrity import check_splits
from strongreid.data.splits import load_splits
from strongreid.engine.hooks import HookBase
from strongreid.engine.trainer import Trainer
from strongreid.errors import ConfigError


def tracklet_groups(records: Sequence[ImageRecord]) -> np.ndarray:
    """One group id per record: its within-camera tracklet, the (pid, camid) pair.

    A footage training set ('tracklets' dataset) numbers tracklets uniquely per camera, so a
    pid never joins two cameras; a labelled set read this way gives perfect tracklets.
    """
    ids: dict[tuple[int, int], int] = {}
    return np.asarray([ids.setdefault((int(r.pid), int(r.camid)), len(ids)) for r in records],
                      dtype=np.int64)


class AdaptTrainer(Trainer):
    """A Trainer whose training split has no identities: labels come from clustering.

    The training records lose their pids before anything else sees them (with ADAPT.TRACKLETS
    'must_link' their (pid, camid) tracklet groups are kept for the clustering, nothing else);
    the model is built with a single unused class, and `PseudoLabelHook` fills the loader and
    the cluster memory before every epoch.
    """

    def _build_data(self) -> None:
        cfg = self.cfg
        if self.dist.world_size > 1:
            raise ConfigError("ADAPT.ENABLED runs in one process (the clustering is not "
                              "distributed); start it without torchrun")
        splits = load_splits(cfg)
        bad = set(check_splits(cfg, splits, write_list=self.dist.is_main))
        train = [r for i, r in enumerate(splits.train) if i not in bad]
        self.tracklets = tracklet_groups(train) if cfg.ADAPT.TRACKLETS != "off" else None
        unlabelled = [ImageRecord(r.path, -1, r.camid) for r in train]
        self.splits = dataclasses.replace(splits, train=unlabelled, num_classes=1)
        self.num_classes = 1
        self.loader = PseudoIdentityLoader(cfg.ADAPT.ITERS)

    def default_hooks(self) -> list[HookBase]:
        return [*super().default_hooks(), PseudoLabelHook(self.splits.train, self.tracklets)]
