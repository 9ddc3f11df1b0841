"""Split statistics and `strongreid datasets stats` (file names and lists only, no decoding)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from strongreid.data.datasets.base import SPLITS, ImageRecord, ReIDDataset, build_dataset


def split_stats(records: Iterable[ImageRecord]) -> dict[str, int]:
    """{"ids", "images", "cams"}: distinct pids, records and distinct camids."""
    pids: set[int] = set()
    cams: set[int] = set()
    images = 0
    for record in records:
        pids.add(record.pid)
        cams.add(record.camid)
        images += 1
    return {"ids": len(pids), "images": images, "cams": len(cams)}


# Splits a loader may add (layumi's val/, Market's gt_bbox/ multi-query): shown when present.
EXTRA_SPLITS = ("val", "multi_query")


def dataset_stats(dataset: ReIDDataset) -> dict[str, dict[str, int]]:
    stats = {split: split_stats(getattr(dataset, split)) for split in SPLITS}
    for split in EXTRA_SPLITS:
        records = getattr(dataset, split, None)
        if records:
            stats[split] = split_stats(records)
    return stats


def format_stats(dataset: ReIDDataset) -> str:
    """The original's "Dataset statistics" table."""
    rule = "  " + "-" * 40
    lines = [
        f"=> {dataset.TITLE} loaded from {dataset.dataset_dir}",
        "Dataset statistics:",
        rule,
        "  subset   | # ids | # images | # cameras",
        rule,
    ]
    for split, stats in dataset_stats(dataset).items():
        lines.append(
            f"  {split:<8} | {stats['ids']:5d} | {stats['images']:8d} | {stats['cams']:9d}"
        )
    lines.append(rule)
    return "\n".join(lines)


def stats_command(name: str, root: str, as_json: bool, options: dict[str, str]) -> int:
    """`strongreid datasets stats NAME --root DIR [--json] [--option k=v]`."""
    dataset = build_dataset(name, root, **options)
    if as_json:
        print(json.dumps(dataset_stats(dataset)))
    else:
        print(format_stats(dataset))
    return 0
