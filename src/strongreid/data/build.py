"""Train and test DataLoaders built from the config."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from yacs.config import CfgNode

from strongreid.config.components import check_at_least, check_choices, config_check
from strongreid.data.decode import DECODERS, resolve_decoder
from strongreid.data.image import ImageDataset
from strongreid.data.integrity import CHECK_MODES
from strongreid.data.samplers import (
    DistributedIdentitySampler,
    RandomIdentitySampler,
    ShuffledSampler,
)
from strongreid.data.transforms import build_transforms
from strongreid.errors import ConfigError, DatasetError


def collate_batch(
    batch: Sequence[tuple[torch.Tensor, int, int, str]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Stack `(img, pid, camid, path)` items into `(images, pids, camids, paths)`."""
    images, pids, camids, paths = zip(*batch, strict=True)
    return (
        torch.stack(images),
        torch.tensor(pids, dtype=torch.int64),
        torch.tensor(camids, dtype=torch.int64),
        list(paths),
    )


def seed_worker(worker_id: int) -> None:
    """Seed `random` and NumPy in a loader worker from the seed torch gave that worker.

    torch itself is already seeded per worker (base seed drawn from the loader's generator,
    plus the worker id), so only the other two generators need it.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class SeededSampler(Sampler):
    """Wraps a sampler so each item carries its own augmentation seed: `(index, seed)`.

    The seed is a function of (SOLVER.SEED, epoch, position in the single-process epoch) alone,
    so the random flips, crops and erasing of an epoch are the same whatever NUM_WORKERS is,
    whether workers are persistent, whether the run was resumed from a checkpoint in between,
    and how many torchrun processes share the epoch.
    """

    def __init__(self, sampler: Sampler[int], seed: int, rank: int = 0) -> None:
        self.sampler = sampler
        self.seed = int(seed)
        self.rank = int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        indices = list(self.sampler)
        positions = getattr(self.sampler, "global_positions", None)
        if positions is None:  # a user's sampler: seeds per rank
            seeds = np.random.SeedSequence([self.seed, self.rank, self.epoch]).generate_state(
                max(len(indices), 1), dtype=np.uint32
            )
            return iter(zip(indices, seeds.tolist()))
        # Seeded by the position in the single-process epoch: under torchrun, the image a rank
        # draws is flipped, cropped and erased exactly as one process would have done it.
        pos = positions(len(indices))
        table = np.random.SeedSequence([self.seed, self.epoch]).generate_state(
            int(pos.max()) + 1 if len(pos) else 1, dtype=np.uint32
        )
        return iter(zip(indices, table[pos].tolist()))


class SeededDataset(torch.utils.data.Dataset):
    """Applies the per-item seed of `SeededSampler` before the wrapped dataset's transforms."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # num_skipped, records, ...
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        if torch.utils.data.get_worker_info() is not None:
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            return self.dataset[index]
        # In the main process, leave the global generators as they were.
        state = (random.getstate(), np.random.get_state())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            item = self.dataset[index]
        random.setstate(state[0])
        np.random.set_state(state[1])
        return item


def _num_workers(cfg: Any) -> int:
    workers = int(cfg.DATALOADER.NUM_WORKERS)
    if workers < 0:
        raise ConfigError(f"DATALOADER.NUM_WORKERS must be >= 0, got {workers}")
    return workers


def _pin_memory(cfg: Any) -> bool:
    device = str(cfg.MODEL.DEVICE).lower()
    return (device == "auto" or device.startswith("cuda")) and torch.cuda.is_available()


def _loader_generator(seed: int, rank: int) -> torch.Generator:
    # Each rank gets its own augmentation stream; the samplers use (seed, epoch) alone so that
    # the identity order stays shared across ranks.
    mixed = int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0])
    return torch.Generator().manual_seed(mixed)


def _check_records(records: Sequence[Any], what: str) -> None:
    if len(records) == 0:
        raise DatasetError(
            f"the {what} set is empty; check DATASETS.ROOT_DIR and the dataset layout"
        )


def build_train_sampler(
    cfg: Any, records: Sequence[Any], rank: int = 0, world_size: int = 1
) -> tuple[Sampler[int], int]:
    """The training sampler named by DATALOADER.SAMPLER and the per-rank batch size it needs."""
    global_batch = int(cfg.SOLVER.IMS_PER_BATCH)
    if global_batch < 1:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH must be >= 1, got {global_batch}")
    if global_batch % world_size != 0:
        raise ConfigError(
            f"SOLVER.IMS_PER_BATCH={global_batch} (the global batch) is not divisible by the "
            f"world size {world_size}"
        )
    seed = int(cfg.SOLVER.SEED)
    if cfg.DATALOADER.SAMPLER == "softmax":
        return ShuffledSampler(len(records), seed, rank, world_size), global_batch // world_size
    k = int(cfg.DATALOADER.NUM_INSTANCE)
    if world_size == 1:
        return RandomIdentitySampler(records, global_batch, k, seed), global_batch
    sampler = DistributedIdentitySampler(records, global_batch, k, rank, world_size, seed)
    return sampler, sampler.local_batch_size


def _loader_options(cfg: Any, rank: int) -> dict[str, Any]:
    """What the train and test loaders share: workers, collation, pinning, worker seeding."""
    workers = _num_workers(cfg)
    return {
        "num_workers": workers,
        "collate_fn": collate_batch,
        "pin_memory": _pin_memory(cfg),
        "drop_last": False,
        "persistent_workers": workers > 0,
        "worker_init_fn": seed_worker,
        "generator": _loader_generator(int(cfg.SOLVER.SEED), rank),
    }


def build_train_loader(
    cfg: Any, records: Sequence[Any], rank: int = 0, world_size: int = 1,
    device: torch.device | str = "cpu", known_corrupt: Sequence[int] = (),
) -> DataLoader:
    """Training loader; call `loader.sampler.set_epoch(epoch)` before each epoch.

    DATALOADER.DATA_PATH 'device' returns a DeviceBatchLoader (cache + batched augmentation on
    `device`) instead; `known_corrupt` are the indices the pre-check found unreadable.
    """
    _check_records(records, "training")
    sampler, batch_size = build_train_sampler(cfg, records, rank, world_size)
    if str(cfg.DATALOADER.DATA_PATH) == "device":
        from strongreid.data.device_loader import build_device_loader

        return build_device_loader(cfg, records, SeededSampler(sampler, int(cfg.SOLVER.SEED), rank),
                                   batch_size, torch.device(device), known_corrupt)
    dataset = ImageDataset(
        records,
        build_transforms(cfg, is_train=True),
        skip_corrupt=bool(cfg.DATALOADER.SKIP_CORRUPT),
        decoder=resolve_decoder(str(cfg.DATALOADER.JPEG_DECODER)),
        known_corrupt=known_corrupt,
    )
    # P×K epochs are whole multiples of the batch, so drop_last=False never yields a ragged
    # triplet batch; the softmax path keeps the original's short last batch.
    return DataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=SeededSampler(sampler, int(cfg.SOLVER.SEED), rank),
        **_loader_options(cfg, rank),
    )


def build_test_loader(cfg: Any, records: Sequence[Any]) -> DataLoader:
    """Evaluation loader in record order; corrupt images always fail, never get substituted.

    An empty record list gives an empty loader: a rank's shard of a small split may be empty.
    """
    batch_size = int(cfg.TEST.IMS_PER_BATCH)
    if batch_size < 1:
        raise ConfigError(f"TEST.IMS_PER_BATCH must be >= 1, got {batch_size}")
    return DataLoader(
        ImageDataset(records, build_transforms(cfg, is_train=False),
                     decoder=resolve_decoder(str(cfg.DATALOADER.JPEG_DECODER))),
        batch_size=batch_size,
        shuffle=False,
        **_loader_options(cfg, rank=0),
    )


SAMPLERS = ("softmax", "triplet", "softmax_triplet")


@config_check("dataloader")
def check_loader_keys(cfg: CfgNode) -> None:
    """DATALOADER.* and the batch sizes: the P x K sampler needs whole identities per batch."""
    check_choices(cfg, {
        "DATALOADER.SAMPLER": SAMPLERS,
        "DATALOADER.CHECK_IMAGES": CHECK_MODES,
        "DATALOADER.JPEG_DECODER": DECODERS,
        "DATALOADER.DATA_PATH": ("pil", "device"),
    })
    check_at_least(cfg, ("SOLVER.IMS_PER_BATCH", "TEST.IMS_PER_BATCH", "DATALOADER.NUM_INSTANCE"))
    if cfg.DATALOADER.NUM_WORKERS < 0:
        raise ConfigError(f"DATALOADER.NUM_WORKERS = {cfg.DATALOADER.NUM_WORKERS} must be >= 0.")
    if cfg.DATALOADER.SAMPLER != "softmax":
        k = cfg.DATALOADER.NUM_INSTANCE
        if cfg.SOLVER.IMS_PER_BATCH % k:
            raise ConfigError(
                f"SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH} is not divisible by "
                f"DATALOADER.NUM_INSTANCE = {k}: the P x K sampler needs whole identities per "
                f"batch (e.g. IMS_PER_BATCH {max(k, cfg.SOLVER.IMS_PER_BATCH // k * k)})."
            )
        if cfg.SOLVER.IMS_PER_BATCH // k < 2:
            raise ConfigError(
                f"SOLVER.IMS_PER_BATCH / DATALOADER.NUM_INSTANCE = {cfg.SOLVER.IMS_PER_BATCH // k}: "
                "triplet mining needs at least 2 identities per batch."
            )
    if cfg.DATALOADER.DATA_PATH == "device" and (cfg.INPUT.COLOR_JITTER or cfg.INPUT.AUTOAUG_PROB > 0):
        raise ConfigError(
            "INPUT.COLOR_JITTER / INPUT.AUTOAUG_PROB run on PIL images; DATALOADER.DATA_PATH 'device' "
            "augments decoded batches without them: use DATA_PATH 'pil' or turn them off."
        )
