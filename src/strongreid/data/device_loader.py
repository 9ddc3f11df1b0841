"""DATALOADER.DATA_PATH 'device': batches from the decoded-image cache, augmented on the device.

A background thread gathers each batch's uint8 images from the memory-mapped cache (pinned when
the device is a GPU) and draws the per-image decisions from the same seeds as the PIL path; the
main thread copies the batch to the device and augments it there (data/gpu_augment.py). The
loader yields what the DataLoader does, `(images, pids, camids, paths)`, with `images` already
normalised float32 on the device, so the trainer's loop is the same for both paths.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from strongreid.data.cache import ImageCache
from strongreid.data.gpu_augment import AugmentParams, BatchAugment
from strongreid.errors import DatasetError

logger = logging.getLogger("strongreid")
_END = object()


class CachedRecords:
    """What the trainer and reports read from `loader.dataset`: records and skipped images."""

    def __init__(self, records: Sequence[Sequence[Any]], corrupt: Sequence[int]) -> None:
        self.records = [(str(r[0]), int(r[1]), int(r[2])) for r in records]
        self.corrupt = sorted(set(int(i) for i in corrupt))
        self.substitute = _substitutes(self.records, self.corrupt)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_skipped(self) -> int:
        return len(self.corrupt)

    def skipped_paths(self) -> list[str]:
        return [self.records[i][0] for i in self.corrupt]


def _substitutes(records: list[tuple[str, int, int]], corrupt: list[int]) -> dict[int, int]:
    """A corrupt index -> the image the PIL path's skip_corrupt would load instead: the next
    readable image of the same identity (cyclic), else the next readable index."""
    bad = set(corrupt)
    if not bad:
        return {}
    by_pid: dict[int, list[int]] = {}
    for i, (_, pid, _) in enumerate(records):
        by_pid.setdefault(pid, []).append(i)
    n = len(records)
    out = {}
    for i in bad:
        same = by_pid[records[i][1]]
        at = same.index(i)
        choice = next((j for j in same[at:] + same[:at] if j not in bad), None)
        if choice is None:
            choice = next((j for j in ((i + s) % n for s in range(1, n)) if j not in bad), None)
        if choice is None:
            raise DatasetError(f"every training image is unreadable (the first is {records[i][0]!r}); "
                               "check the dataset folder")
        out[i] = choice
    return out


class DeviceBatchLoader:
    """Iterable of device batches; `sampler.set_epoch(e)` selects the epoch like a DataLoader."""

    def __init__(self, cache: ImageCache, records: Sequence[Sequence[Any]], sampler: Any, batch_size: int,
                 augment: BatchAugment, device: torch.device, prefetch: int = 3) -> None:
        self.cache = cache
        self.dataset = CachedRecords(records, cache.corrupt)
        self.sampler = sampler  # a SeededSampler: yields (index, seed)
        self.batch_size = int(batch_size)
        self.augment = augment
        self.device = torch.device(device)
        self.prefetch = int(prefetch)
        self.pin = self.device.type == "cuda"

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def _host_batches(self) -> Iterator[tuple[torch.Tensor, AugmentParams, list[int]]]:
        items = list(self.sampler)
        sub = self.dataset.substitute
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            index = [sub.get(int(i), int(i)) for i, _ in chunk]
            images = torch.from_numpy(np.ascontiguousarray(self.cache.images[index]))
            if self.pin:
                images = images.pin_memory()
            yield images, self.augment.draw_params([s for _, s in chunk]), index

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]]:
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()

        def produce() -> None:
            try:
                if self.pin:
                    # Pinned buffers belong to the current device's context: without this every
                    # torchrun rank's loader thread would open a context on GPU 0.
                    torch.cuda.set_device(self.device)
                for batch in self._host_batches():
                    while not stop.is_set():
                        try:
                            q.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(_END)
            except BaseException as exc:  # handed to the consumer, raised there
                q.put(exc)

        thread = threading.Thread(target=produce, name="strongreid-device-loader", daemon=True)
        thread.start()
        records = self.dataset.records
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                images, params, index = item
                images = images.to(self.device, non_blocking=True)
                x = self.augment(images, params)
                pids = torch.tensor([records[i][1] for i in index], dtype=torch.int64)
                camids = torch.tensor([records[i][2] for i in index], dtype=torch.int64)
                yield x, pids, camids, [records[i][0] for i in index]
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


def build_device_loader(cfg: Any, records: Sequence[Any], sampler: Any, batch_size: int,
                        device: torch.device, known_corrupt: Sequence[int] = ()) -> DeviceBatchLoader:
    """The 'device' data path for `records`: opens (or builds) the cache at INPUT.SIZE_TRAIN."""
    from strongreid.data.cache import default_cache_dir, open_cache
    from strongreid.data.gpu_augment import build_batch_augment

    augment = build_batch_augment(cfg, train=True)
    cache = open_cache([str(r[0]) for r in records], (augment.height, augment.width), default_cache_dir(cfg),
                       name="train", decoder=str(cfg.DATALOADER.JPEG_DECODER),
                       skip_corrupt=bool(cfg.DATALOADER.SKIP_CORRUPT), known_corrupt=known_corrupt,
                       workers=max(1, int(cfg.DATALOADER.NUM_WORKERS)),
                       interpolation=str(cfg.INPUT.INTERPOLATION))
    logger.info("data path 'device': %d images from the cache %s, augmented in batches on %s",
                len(records), cache.path, device)
    return DeviceBatchLoader(cache, records, sampler, batch_size, augment, device)
