"""Which images a run trains and tests on, from DATASETS.* keys."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from yacs.config import CfgNode

from strongreid.config import dataset_names

logger = logging.getLogger("strongreid")


@dataclass
class Splits:
    train: list  # ImageRecord, pids 0..num_classes-1
    query: list
    gallery: list
    num_classes: int
    train_names: list[str]
    test_name: str


def load_splits(cfg: CfgNode, *, need_train: bool = True) -> Splits:
    """Train on every dataset of DATASETS.NAMES (pids/camids kept disjoint), test on TEST_NAME."""
    from strongreid.data.datasets import build_dataset, combine_train, dataset_options

    names = dataset_names(cfg)
    test_name = cfg.DATASETS.TEST_NAME or names[0]
    loaded = {}
    for name in dict.fromkeys(names + [test_name]):
        if not need_train and name != test_name:
            continue
        loaded[name] = build_dataset(name, cfg.DATASETS.ROOT_DIR, **dataset_options(cfg, name))
    if need_train:
        train_sets = [loaded[n] for n in names]
        train = combine_train(train_sets) if len(train_sets) > 1 else list(train_sets[0].train)
    else:
        train = list(loaded[test_name].train)
    num_classes = len({r[1] for r in train})
    test = loaded[test_name]
    return Splits(train, list(test.query), list(test.gallery), num_classes, names, test_name)
