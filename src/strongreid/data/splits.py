"""Which images a run trains and tests on, from DATASETS.* keys."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

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
    # DATASETS.VALIDATION: images of training identities (train labels) held out for val loss
    val: list = field(default_factory=list)
    # the test dataset's multi-query images (TEST.MULTI_QUERY), its own pids and camids
    multi_query: list = field(default_factory=list)


def load_splits(cfg: CfgNode, *, need_train: bool = True) -> Splits:
    """Train on every dataset of DATASETS.NAMES (pids/camids kept disjoint), test on TEST_NAME."""
    from strongreid.data.datasets import build_dataset, dataset_options

    names = dataset_names(cfg)
    test_name = cfg.DATASETS.TEST_NAME or names[0]
    loaded = {}
    for name in dict.fromkeys(names + [test_name]):
        if not need_train and name != test_name:
            continue
        loaded[name] = build_dataset(name, cfg.DATASETS.ROOT_DIR, **dataset_options(cfg, name))
    val: list = []
    if need_train:
        train_sets = [loaded[n] for n in names]
        train, val = _train_and_val(cfg, train_sets)
    else:
        train = list(loaded[test_name].train)
    num_classes = len({r[1] for r in train})
    test = loaded[test_name]
    return Splits(train, list(test.query), list(test.gallery), num_classes, names, test_name,
                  val=val, multi_query=list(test.multi_query))


def _train_and_val(cfg: CfgNode, datasets: list) -> tuple[list, list]:
    """The training split and, with DATASETS.VALIDATION 'first', the validation split, in the
    labels of the combined training split."""
    from strongreid.data.datasets import combine_train
    from strongreid.data.validation import first_image_split

    if cfg.DATASETS.VALIDATION == "off":
        trains = [list(d.train) for d in datasets]
        vals: list[list] = [[] for _ in datasets]
    else:
        trains, vals = [], []
        for dataset in datasets:
            if dataset.val:  # the dataset's own (layumi's val/): its train split already lacks
                trains.append(list(dataset.train))  # those images unless train_all was read
                vals.append(list(dataset.val))
            else:
                train, val = first_image_split(dataset.train, bool(cfg.DATASETS.TRAIN_ALL))
                trains.append(train)
                vals.append(val)
        logger.info("validation split: %d images of %d identities",
                    sum(map(len, vals)), sum(len({r[1] for r in v}) for v in vals))
    if len(datasets) == 1:
        return trains[0], vals[0]
    return combine_train(datasets, trains), combine_train(datasets, vals)
