"""Dataset loaders: `build_dataset(name, root, **options)` over the `DATASETS` registry.

Add your own with `@DATASETS.register("name")` on a `ReIDDataset` subclass whose `load()`
returns (train, query, gallery) lists of `ImageRecord(path, pid, camid)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from yacs.config import CfgNode

from strongreid.config import dataset_names, flag
from strongreid.config.components import check_choices, config_check, selects
from strongreid.data.datasets.base import (
    DATASETS,
    IMAGE_EXTENSIONS,
    FileIndex,
    ImageRecord,
    Option,
    ReIDDataset,
    build_dataset,
    list_image_names,
    parse_pid_cam,
    read_list_lines,
    relabel,
)
from strongreid.data.datasets.cuhk03 import CUHK03
from strongreid.data.datasets.generic import FolderDataset, ListDataset
from strongreid.data.datasets.layumi import DGMarket, LayumiPrepared, layumi_camera
from strongreid.data.datasets.market import (
    DukeMTMCreID,
    Market1501,
    MarketStyleDataset,
    OccludedDuke,
    SyntheticPedestrians,
)
from strongreid.data.datasets.msmt17 import MSMT17, parse_msmt_camera
from strongreid.data.datasets.stats import dataset_stats, format_stats, split_stats, stats_command
from strongreid.data.datasets.tracklets import FootageTracklets
from strongreid.data.datasets.vehicleid import VehicleID
from strongreid.data.datasets.veri import VeRi776
from strongreid.errors import ConfigError, DatasetError

__all__ = [
    "CUHK03",
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "MSMT17",
    "DGMarket",
    "DukeMTMCreID",
    "FileIndex",
    "FolderDataset",
    "FootageTracklets",
    "ImageRecord",
    "LayumiPrepared",
    "ListDataset",
    "Market1501",
    "MarketStyleDataset",
    "OccludedDuke",
    "Option",
    "ReIDDataset",
    "SyntheticPedestrians",
    "VeRi776",
    "VehicleID",
    "build_dataset",
    "combine_train",
    "dataset_options",
    "dataset_stats",
    "format_stats",
    "layumi_camera",
    "list_image_names",
    "parse_msmt_camera",
    "parse_pid_cam",
    "read_list_lines",
    "relabel",
    "split_stats",
    "stats_command",
]


def dataset_options(cfg: CfgNode, name: str) -> dict[str, Any]:
    """The loader options of dataset `name` that the config sets.

    Only options the loader declares are passed; an empty string means "the loader's default"
    (e.g. the `folder` loader's bounding_box_train when DATASETS.LIST_TRAIN is '').
    """
    declared = DATASETS.get(name).option_specs()
    values = {
        "merge_val": flag(cfg.DATASETS.MSMT17_MERGE_VAL),
        "kind": str(cfg.DATASETS.CUHK03_KIND),
        "train": str(cfg.DATASETS.LIST_TRAIN),
        "query": str(cfg.DATASETS.LIST_QUERY),
        "gallery": str(cfg.DATASETS.LIST_GALLERY),
        "skip_corrupt": flag(cfg.DATALOADER.SKIP_CORRUPT),
        "train_all": bool(cfg.DATASETS.TRAIN_ALL),
        "test_size": str(cfg.DATASETS.VEHICLEID_TEST_SIZE),
    }
    return {key: value for key, value in values.items() if key in declared and value != ""}


def combine_train(
    datasets: Sequence[ReIDDataset], splits: Sequence[Sequence[ImageRecord]] | None = None
) -> list[ImageRecord]:
    """Concatenate train splits, offsetting pids and camids so no two datasets share a label.

    `splits` (one list per dataset, in its train labels, e.g. its validation images) are
    offset exactly as the train splits are, instead of the train splits themselves.
    """
    combined: list[ImageRecord] = []
    pid_offset = 0
    cam_offset = 0
    for index, dataset in enumerate(datasets):
        if not dataset.train:
            raise DatasetError(
                f"{dataset.TITLE} at {dataset.dataset_dir} has no train split to train on; "
                "remove it from DATASETS.NAMES or give it a train list."
            )
        records = dataset.train if splits is None else splits[index]
        combined.extend(
            ImageRecord(r.path, r.pid + pid_offset, r.camid + cam_offset) for r in records
        )
        # Train pids are 0..N-1 after relabelling; camids need not be contiguous, so the next
        # dataset starts after the largest one.
        pid_offset += dataset.num_train_pids
        cam_offset += max(r.camid for r in dataset.train) + 1
    return combined


def _configured_datasets(cfg: CfgNode) -> list[str]:
    names = dataset_names(cfg)
    if not names:
        raise ConfigError("DATASETS.NAMES is empty; name at least one dataset, e.g. market1501.")
    return names + ([cfg.DATASETS.TEST_NAME] if cfg.DATASETS.TEST_NAME else [])


selects("DATASETS.NAMES", DATASETS, names=_configured_datasets,
        unknown=lambda name: f"DATASETS.NAMES: unknown dataset {name!r}")


@config_check("datasets")
def check_dataset_keys(cfg: CfgNode) -> None:
    """The DATASETS.* options of the loaders."""
    check_choices(cfg, {"DATASETS.CUHK03_KIND": ("labeled", "detected"),
                        "DATASETS.VALIDATION": ("off", "first")})
    if cfg.DATASETS.VEHICLEID_TEST_SIZE not in (800, 1600, 2400):
        raise ConfigError(
            f"DATASETS.VEHICLEID_TEST_SIZE = {cfg.DATASETS.VEHICLEID_TEST_SIZE} is not allowed; "
            "choose one of 800, 1600, 2400 (the official VehicleID test lists)."
        )
