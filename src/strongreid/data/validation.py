"""layumi's validation split: the first image of each training identity, held out or kept."""

from __future__ import annotations

from collections.abc import Sequence

from strongreid.data.datasets.base import ImageRecord


def first_image_split(
    records: Sequence[ImageRecord], train_all: bool = False
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, val): val holds the first image, in path order, of every identity.

    layumi's prepare.py moves the first image its directory walk meets; path order is the
    reproducible version of that. An identity with a single image keeps it for training (it
    would otherwise be a class without a training image). With `train_all` the val images
    stay in train as well (layumi's --train_all).
    """
    first: dict[int, ImageRecord] = {}
    counts: dict[int, int] = {}
    for record in records:
        counts[record.pid] = counts.get(record.pid, 0) + 1
        held = first.get(record.pid)
        if held is None or record.path < held.path:
            first[record.pid] = record
    val = sorted((r for pid, r in first.items() if counts[pid] > 1), key=lambda r: r.path)
    if train_all:
        return list(records), val
    held_out = {r.path for r in val}
    return [r for r in records if r.path not in held_out], val
