"""Image decoding and the map-style dataset the loaders wrap."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from strongreid.data.decode import JPEG_SUFFIXES, decode_jpeg_bytes
from strongreid.errors import DatasetError

logger = logging.getLogger(__name__)

# What PIL raises for a file that exists but is not a readable image: unknown format,
# truncated data ("image file is truncated"), broken headers, decompression-bomb limits.
_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    Image.DecompressionBombError,
)


def read_image(path: str | os.PathLike[str], decoder: str = "pil") -> Image.Image:
    """Decode an image to RGB; a bad file fails at once (the original retried forever).

    `decoder` (a resolved DATALOADER.JPEG_DECODER, see data/decode.py) decodes JPEG files; any
    file it cannot decode goes to Pillow, whose result or error is then the answer.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(
            f"image file not found: {path!r}; check DATASETS.ROOT_DIR and the dataset layout"
        )
    if decoder != "pil" and path.lower().endswith(JPEG_SUFFIXES):
        try:
            with open(path, "rb") as f:
                return Image.fromarray(decode_jpeg_bytes(f.read(), decoder), "RGB")
        except Exception:  # CMYK, truncated, not really a JPEG...: Pillow decides
            pass
    try:
        with Image.open(path) as img:
            # convert() forces a full decode inside the try, so truncated files fail here.
            return img.convert("RGB")
    except _DECODE_ERRORS as exc:
        raise DatasetError(
            f"cannot decode image {path!r} ({exc}); replace or delete the file, "
            "or set DATALOADER.SKIP_CORRUPT True to skip corrupt training images"
        ) from None


class ImageDataset(Dataset):
    """Records `(path, pid, camid)` -> `(image tensor, pid, camid, path)`.

    With `skip_corrupt=True` an undecodable image is replaced by the next image of the same
    identity (or, when the identity has no readable image, the next readable index). Corrupt
    files are remembered in a shared-memory flag array so that the count `num_skipped` covers
    every loader worker and each file is warned about once.
    """

    def __init__(
        self,
        records: Sequence[Sequence[Any]],
        transform: Callable[[Image.Image], Any] | None = None,
        skip_corrupt: bool = False,
        decoder: str = "pil",
        known_corrupt: Sequence[int] = (),
    ) -> None:
        self.decoder = decoder
        self.records = [(str(r[0]), int(r[1]), int(r[2])) for r in records]
        self.transform = transform
        self.skip_corrupt = bool(skip_corrupt)
        self._by_pid: dict[int, list[int]] = {}
        for index, (_, pid, _) in enumerate(self.records):
            self._by_pid.setdefault(pid, []).append(index)
        # Shared memory: forked or spawned workers write into the same bytes the main process reads.
        self._corrupt = torch.zeros(len(self.records), dtype=torch.uint8).share_memory_()
        # Found by the pre-check (data/integrity.py): never drawn, and counted from the start.
        if known_corrupt:
            self._corrupt[torch.as_tensor(list(known_corrupt), dtype=torch.int64)] = 1

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_skipped(self) -> int:
        """How many distinct images were found corrupt and replaced so far."""
        return int(self._corrupt.sum())

    def skipped_paths(self) -> list[str]:
        """The paths counted by `num_skipped`."""
        flagged = torch.nonzero(self._corrupt).flatten().tolist()
        return [self.records[i][0] for i in flagged]

    def __getitem__(self, index: int) -> tuple[Any, int, int, str]:
        if not self.skip_corrupt:
            return self._load(index)
        for candidate in self._candidates(index):
            if self._corrupt[candidate].item():
                continue
            try:
                return self._load(candidate)
            except DatasetError as exc:
                if not self._corrupt[candidate].item():
                    self._corrupt[candidate] = 1
                    logger.warning("skipping corrupt image: %s", exc)
        raise DatasetError(
            f"every image of the dataset is unreadable (the first is {self.records[index][0]!r}); "
            "check the dataset folder"
        )

    def _load(self, index: int) -> tuple[Any, int, int, str]:
        path, pid, camid = self.records[index]
        img = read_image(path, self.decoder)
        if self.transform is not None:
            img = self.transform(img)
        return img, pid, camid, path

    def _candidates(self, index: int) -> Iterator[int]:
        """The index, the rest of its identity (cyclic), then every other index."""
        same = self._by_pid[self.records[index][1]]
        at = same.index(index)
        yield from same[at:]
        yield from same[:at]
        own = set(same)
        n = len(self.records)
        for step in range(1, n):
            other = (index + step) % n
            if other not in own:
                yield other
