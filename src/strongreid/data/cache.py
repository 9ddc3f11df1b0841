"""A decoded-image cache: every image of a split decoded and resized once, kept as uint8.

One file per (image list, size): N x H x W x 3 uint8, memory-mapped, so loader workers and all
torchrun ranks of a node share one copy in the page cache and a batch is a few memcpys instead
of N JPEG decodes and resizes. The pixels are exactly what the PIL path has after its Resize
(Pillow's resize of the decoded image with INPUT.INTERPOLATION's filter), so both paths see
the same images.

The cache is keyed by the image paths and the size, and records each file's size and
modification time: when any file changes, the next run rebuilds it. Building takes a file lock,
so concurrent ranks build it once. A metadata file written after the data marks it complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from strongreid.data.decode import resolve_decoder
from strongreid.data.image import read_image
from strongreid.errors import DatasetError
from strongreid.paths import atomic_path, atomic_write, atomic_write_text

logger = logging.getLogger("strongreid")

FORMAT_VERSION = 1


@dataclass
class ImageCache:
    """The mapped images and the indices that could not be decoded (their rows are zeros)."""

    path: Path
    images: np.ndarray  # N x H x W x 3 uint8 (read-only memmap)
    corrupt: list[int]

    def __len__(self) -> int:
        return self.images.shape[0]


def default_cache_dir(cfg) -> Path:
    """DATALOADER.CACHE_DIR, or DATASETS.ROOT_DIR/.strongreid_cache when it is empty."""
    return Path(cfg.DATALOADER.CACHE_DIR or os.path.join(cfg.DATASETS.ROOT_DIR, ".strongreid_cache"))


def _identity(paths: Sequence[str], size: tuple[int, int], interpolation: str = "bilinear") -> str:
    # Bilinear caches keep the names they had before the filter became part of the key.
    tag = "" if interpolation == "bilinear" else f" {interpolation}"
    h = hashlib.sha256(f"v{FORMAT_VERSION} {size[0]}x{size[1]}{tag}\n".encode())
    for p in paths:
        h.update(os.path.abspath(p).encode() + b"\n")
    return h.hexdigest()[:20]


def _fingerprint(paths: Sequence[str]) -> str:
    """Changes when any file is replaced, rewritten, resized or removed."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(b"missing\n")
    return h.hexdigest()


RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resize_like_pil_path(img: Image.Image, size: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """What T.Resize((h, w), interpolation) makes of a PIL image (it calls Image.resize((w, h),
    filter))."""
    if interpolation not in RESAMPLING:
        raise DatasetError(f"the image cache resizes with {', '.join(RESAMPLING)}, not {interpolation!r}")
    h, w = size
    if img.size != (w, h):
        img = img.resize((w, h), RESAMPLING[interpolation])
    return np.asarray(img)


def open_cache(
    paths: Sequence[str],
    size: tuple[int, int],
    cache_dir: str | os.PathLike[str],
    *,
    name: str = "images",
    decoder: str = "auto",
    skip_corrupt: bool = False,
    known_corrupt: Sequence[int] = (),
    workers: int | None = None,
    interpolation: str = "bilinear",
) -> ImageCache:
    """Map the cache of `paths` resized to `size` (H, W) with `interpolation`, building it first
    when absent or stale."""
    size = (int(size[0]), int(size[1]))
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create the image cache folder {cache_dir} ({exc}); set "
                           "DATALOADER.CACHE_DIR to a writable folder") from None
    base = cache_dir / f"{name}-{size[0]}x{size[1]}-{_identity(paths, size, interpolation)}"
    data_path, meta_path = base.with_suffix(".u8"), base.with_suffix(".json")
    fingerprint = _fingerprint(paths)
    with open(base.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other ranks wait here while one builds
        meta = _read_meta(meta_path)
        if meta is None or meta.get("fingerprint") != fingerprint or meta.get("count") != len(paths) \
                or not data_path.is_file():
            reason = "first use" if meta is None else "files changed"
            logger.info("building the image cache %s (%d images at %dx%d, %s)", data_path, len(paths),
                        size[0], size[1], reason)
            corrupt = _build(paths, size, data_path, resolve_decoder(decoder), skip_corrupt,
                             set(int(i) for i in known_corrupt), workers, interpolation)
            meta = {"version": FORMAT_VERSION, "count": len(paths), "height": size[0], "width": size[1],
                    "fingerprint": fingerprint, "corrupt": corrupt}
            atomic_write_text(meta_path, json.dumps(meta), durable=False)
    if not skip_corrupt and meta["corrupt"]:
        raise DatasetError(f"the image cache {data_path} records {len(meta['corrupt'])} unreadable images "
                           f"(the first is {paths[meta['corrupt'][0]]!r}); replace them or set "
                           "DATALOADER.SKIP_CORRUPT True")
    images = np.memmap(data_path, dtype=np.uint8, mode="r", shape=(len(paths), size[0], size[1], 3)) \
        if paths else np.zeros((0, size[0], size[1], 3), np.uint8)
    return ImageCache(data_path, images, sorted(set(meta["corrupt"]) | set(int(i) for i in known_corrupt)))


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("version") == FORMAT_VERSION else None


def _build(paths: Sequence[str], size: tuple[int, int], data_path: Path, decoder: str, skip_corrupt: bool,
           known: set[int], workers: int | None, interpolation: str = "bilinear") -> list[int]:
    if not paths:
        atomic_write(data_path, lambda f: None, durable=False)
        return []
    # Filled through a memmap under the temporary name; not fsync'ed (derived data, written once
    # per cache build, as before).
    with atomic_path(data_path, durable=False) as tmp:
        arr = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(len(paths), size[0], size[1], 3))

        def fill(i: int) -> int | None:
            if i in known:
                return i
            try:
                arr[i] = resize_like_pil_path(read_image(paths[i], decoder), size, interpolation)
            except DatasetError:
                if not skip_corrupt:
                    raise
                return i
            return None

        # Decoders and resizing release the GIL: threads scale over the cores.
        with ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1)) as pool:
            bad = [i for i in pool.map(fill, range(len(paths)), chunksize=32) if i is not None]
        arr.flush()
    if bad:
        logger.warning("image cache: %d unreadable images left blank and never drawn", len(bad))
    return bad
