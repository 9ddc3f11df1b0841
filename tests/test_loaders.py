"""read_image, ImageDataset (corrupt-file handling) and the train/test loaders on tiny images."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from strongreid.config import get_cfg_defaults
from strongreid.data import (
    ImageDataset,
    build_test_loader,
    build_train_loader,
    read_image,
)
from strongreid.data.samplers import DistributedIdentitySampler
from strongreid.errors import ConfigError, DatasetError


class Record(NamedTuple):
    """Same fields as strongreid.data.datasets.ImageRecord."""

    path: str
    pid: int
    camid: int


def write_image(path: Path, value: int, size: tuple[int, int] = (8, 16)) -> str:
    """A small JPEG whose pixels encode `value` (so tests can tell images apart)."""
    Image.new("RGB", size, (value, 255 - value, value // 2)).save(path, format="JPEG", quality=95)
    return str(path)


def write_corrupt(path: Path) -> str:
    path.write_bytes(b"this is not an image")
    return str(path)


def make_records(root: Path, counts: list[int]) -> list[Record]:
    records = []
    for pid, n in enumerate(counts):
        for i in range(n):
            path = write_image(root / f"{pid:04d}_c{i % 2}_{i}.jpg", (pid * 37 + i * 11) % 256)
            records.append(Record(path, pid, i % 2))
    return records


def loader_cfg(workers: int, sampler: str = "softmax_triplet", batch: int = 8, k: int = 2):
    cfg = get_cfg_defaults()
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.SIZE_TRAIN = [16, 8]
    cfg.INPUT.SIZE_TEST = [12, 6]
    cfg.INPUT.PADDING = 2
    cfg.DATALOADER.NUM_WORKERS = workers
    cfg.DATALOADER.SAMPLER = sampler
    cfg.DATALOADER.NUM_INSTANCE = k
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.SOLVER.SEED = 3
    cfg.TEST.IMS_PER_BATCH = 5
    return cfg


def test_read_image_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("L", (5, 7), 128).save(path)
    img = read_image(path)
    assert img.mode == "RGB" and img.size == (5, 7)
    assert img.getpixel((0, 0)) == (128, 128, 128)


def test_read_image_missing_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "0001_c1.jpg"
    with pytest.raises(DatasetError, match="not found") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_read_image_corrupt_names_path(tmp_path: Path) -> None:
    garbage = write_corrupt(tmp_path / "garbage.jpg")
    with pytest.raises(DatasetError, match="cannot decode") as info:
        read_image(garbage)
    assert garbage in str(info.value)
    # A JPEG cut in half decodes lazily; the error must still surface here.
    whole = tmp_path / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        whole
    )
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DatasetError, match="cannot decode") as info:
        read_image(truncated)
    assert str(truncated) in str(info.value)


def test_dataset_items_plain_and_named_tuples(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.jpg", 10)
    for record in ((path, 4, 1), Record(path, 4, 1)):
        dataset = ImageDataset([record], transform=None)
        img, pid, camid, got_path = dataset[0]
        assert isinstance(img, Image.Image) and (pid, camid, got_path) == (4, 1, path)
        assert len(dataset) == 1


def test_skip_corrupt_replaces_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good_a = write_image(tmp_path / "a.jpg", 10)
    bad_b = write_corrupt(tmp_path / "b.jpg")
    good_c = write_image(tmp_path / "c.jpg", 20)
    bad_d = write_corrupt(tmp_path / "d.jpg")
    good_e = write_image(tmp_path / "e.jpg", 30)
    records = [(good_a, 0, 0), (bad_b, 0, 1), (good_c, 0, 0), (bad_d, 1, 0), (good_e, 2, 1)]

    strict = ImageDataset(records, transform=None)
    with pytest.raises(DatasetError, match="b.jpg"):
        strict[1]

    dataset = ImageDataset(records, transform=None, skip_corrupt=True)
    assert dataset.num_skipped == 0
    with caplog.at_level(logging.WARNING, logger="strongreid.data.image"):
        # b -> the next image of the same identity (c).
        assert dataset[1][1:] == (0, 0, good_c)
        # d is the only image of identity 1 -> the next index (e), with e's own labels.
        assert dataset[3][1:] == (2, 1, good_e)
        assert dataset[1][1:] == (0, 0, good_c)
        assert dataset[0][1:] == (0, 0, good_a)
    assert dataset.num_skipped == 2
    assert sorted(dataset.skipped_paths()) == sorted([bad_b, bad_d])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # once per file, not once per access
    assert bad_b in warnings[0] and bad_d in warnings[1]


def test_skip_corrupt_all_unreadable(tmp_path: Path) -> None:
    records = [(write_corrupt(tmp_path / f"{i}.jpg"), i, 0) for i in range(3)]
    with pytest.raises(DatasetError, match="every image"):
        ImageDataset(records, transform=None, skip_corrupt=True)[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_pk_batches(tmp_path: Path, workers: int) -> None:
    records = make_records(tmp_path, [3, 4, 2, 5, 1, 4])
    loader = build_train_loader(loader_cfg(workers), records)
    assert hasattr(loader.sampler, "set_epoch")
    loader.sampler.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) == len(loader.sampler) // 8
    assert batches
    for images, pids, camids, paths in batches:
        assert images.shape == (8, 3, 16, 8) and images.dtype == torch.float32
        assert pids.dtype == torch.int64 and camids.dtype == torch.int64
        assert isinstance(paths, list) and len(paths) == 8
        assert sorted(Counter(pids.tolist()).values()) == [2, 2, 2, 2]
        by_path = {r.path: r for r in records}
        assert pids.tolist() == [by_path[p].pid for p in paths]
        assert camids.tolist() == [by_path[p].camid for p in paths]


def test_train_loader_order_and_augmentation_reproducible(tmp_path: Path) -> None:
    records = make_records(tmp_path, [3, 4, 2, 5])
    runs = []
    for workers in (0, 2, 2):
        loader = build_train_loader(loader_cfg(workers, batch=4), records)
        loader.sampler.set_epoch(2)
        runs.append(list(loader))
    paths = [[p for batch in run for p in batch[3]] for run in runs]
    assert paths[0] == paths[1] == paths[2]  # the sampler order ignores the workers
    # Augmentations are seeded per item: the same whatever the number of workers.
    for (a, *_), (b, *_), (c, *_) in zip(runs[0], runs[1], runs[2], strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_epoch_augmentation_does_not_depend_on_earlier_epochs(tmp_path: Path) -> None:
    """What makes `--resume` exact: epoch 2 looks the same whether or not epoch 1 ran before."""
    records = make_records(tmp_path, [3, 4, 2, 5])
    cfg = loader_cfg(2, batch=4)
    straight = build_train_loader(cfg, records)
    straight.sampler.set_epoch(1)
    first = list(straight)
    straight.sampler.set_epoch(2)
    second = list(straight)
    fresh = build_train_loader(cfg, records)
    fresh.sampler.set_epoch(2)
    for (a, *_), (b, *_) in zip(second, list(fresh), strict=True):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for (a, *_), (b, *_) in zip(first, second, strict=False))


def test_softmax_loader_keeps_short_last_batch(tmp_path: Path) -> None:
    records = make_records(tmp_path, [3, 4, 3])
    loader = build_train_loader(loader_cfg(0, sampler="softmax", batch=4), records)
    sizes = [batch[0].shape[0] for batch in loader]
    assert sizes == [4, 4, 2]
    seen = [p for batch in loader for p in batch[3]]
    assert sorted(seen) == sorted(r.path for r in records)


def test_distributed_train_loader_whole_identities(tmp_path: Path) -> None:
    records = make_records(tmp_path, [3, 4, 2, 5, 2, 4])
    cfg = loader_cfg(0, batch=8)
    per_rank = []
    for rank in range(2):
        loader = build_train_loader(cfg, records, rank=rank, world_size=2)
        assert isinstance(loader.sampler.sampler, DistributedIdentitySampler)
        assert loader.batch_size == 4
        batches = list(loader)
        for _, pids, _, _ in batches:
            assert sorted(Counter(pids.tolist()).values()) == [2, 2]
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1])


def test_test_loader_keeps_record_order(tmp_path: Path) -> None:
    records = make_records(tmp_path, [3, 4, 4])
    for workers in (0, 2):
        loader = build_test_loader(loader_cfg(workers), records)
        batches = list(loader)
        assert [b[0].shape for b in batches] == [(5, 3, 12, 6)] * 2 + [(1, 3, 12, 6)]
        assert [p for b in batches for p in b[3]] == [r.path for r in records]
        assert torch.cat([b[1] for b in batches]).tolist() == [r.pid for r in records]


def test_skip_corrupt_counted_across_workers(tmp_path: Path) -> None:
    records = make_records(tmp_path, [4, 4])
    records[1] = records[1]._replace(path=write_corrupt(tmp_path / "bad1.jpg"))
    records[6] = records[6]._replace(path=write_corrupt(tmp_path / "bad6.jpg"))
    cfg = loader_cfg(2, sampler="softmax", batch=4)
    cfg.DATALOADER.SKIP_CORRUPT = True
    loader = build_train_loader(cfg, records)
    paths = [p for batch in loader for p in batch[3]]
    assert len(paths) == 8 and not any("bad" in p for p in paths)
    assert loader.dataset.num_skipped == 2


def test_empty_test_shard_gives_empty_loader() -> None:
    assert list(build_test_loader(loader_cfg(2), [])) == []


def test_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="empty"):
        build_train_loader(loader_cfg(0), [])
    records = make_records(tmp_path, [2, 2])
    cfg = loader_cfg(0, sampler="softmax", batch=5)
    with pytest.raises(ConfigError, match="not divisible by the world size 2"):
        build_train_loader(cfg, records, rank=0, world_size=2)


@pytest.mark.parametrize("sampler", ["softmax_triplet", "softmax"])
def test_two_ranks_augment_like_one_process(tmp_path: Path, sampler: str) -> None:
    """Each global batch of 2 ranks holds the same augmented images as the 1-process batch."""
    records = make_records(tmp_path, [4, 4, 4, 4, 4, 4])  # 24 images: no padding for softmax
    cfg = loader_cfg(0, sampler=sampler, batch=8)
    single = build_train_loader(cfg, records)
    ranks = [build_train_loader(cfg, records, rank=r, world_size=2) for r in range(2)]
    for loader in (single, *ranks):
        loader.sampler.set_epoch(3)
    one = list(single)
    two = list(zip(*[list(loader) for loader in ranks], strict=True))
    assert len(two) == len(one)
    for (img, _, _, paths), parts in zip(one, two, strict=True):
        got = {p: x for part in parts for x, p in zip(part[0], part[3], strict=True)}
        want = dict(zip(paths, img, strict=True))
        assert set(got) == set(want)
        for p, x in want.items():
            assert torch.equal(got[p], x), p
