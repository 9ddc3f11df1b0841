"""Check every image before a run starts, in parallel, and name all unreadable files at once.

Without it a run stops at the first bad file, deep inside a loader worker, and a dataset with
200 bad files takes 200 runs to clean. 'header' (the default) opens each file's header (format,
size) and, for JPEG and PNG, looks for the end marker a truncated file lacks; a file that fails
only that last test is decoded in full before it is called bad, so a valid file with trailing
bytes is never rejected. 'full' decodes every image, as training would. Threads suffice: the
work is file reads and C decoders that release the GIL.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from strongreid.data.image import _DECODE_ERRORS, read_image
from strongreid.errors import ConfigError, DatasetError
from strongreid.paths import atomic_write_text

logger = logging.getLogger("strongreid")

CHECK_MODES = ("header", "full", "off")
LIST_NAME = "unreadable_images.txt"
SHOWN = 10  # files named in the error message; the list file has them all
_TAIL = 4096  # bytes searched for the end marker (cameras pad some JPEGs after it)


def check_image(path: str, full: bool = False) -> str | None:
    """Why the image at `path` cannot be used, or None when it can."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return "file not found"
    if size == 0:
        return "empty file"
    if full:
        try:
            read_image(path)
        except DatasetError as exc:
            return _reason(exc)
        return None
    try:
        with Image.open(path) as img:
            width, height = img.size
            fmt = img.format
    except _DECODE_ERRORS as exc:
        return f"unreadable header ({exc})"
    if width < 1 or height < 1:
        return f"zero-sized image ({width}x{height})"
    marker = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(fmt or "")
    if marker is not None:
        with open(path, "rb") as f:
            f.seek(max(0, size - _TAIL))
            if marker not in f.read():
                return check_image(path, full=True)  # confirm before calling it bad
    return None


def _reason(exc: DatasetError) -> str:
    # read_image's message is "cannot decode image '<path>' (<cause>); replace ...": keep the cause.
    text = str(exc)
    if "(" in text and ")" in text:
        return "cannot decode (" + text.split("(", 1)[1].rsplit(")", 1)[0] + ")"
    return text


def find_unreadable(paths: Sequence[str], mode: str = "header", workers: int | None = None) -> list[tuple[int, str]]:
    """`(index, reason)` of every path that fails the check, in input order."""
    if mode not in CHECK_MODES:
        raise ConfigError(f"DATALOADER.CHECK_IMAGES = {mode!r}: choose one of {', '.join(map(repr, CHECK_MODES))}")
    if mode == "off" or not paths:
        return []
    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    full = mode == "full"
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(lambda p: check_image(p, full), paths, chunksize=64))
    return [(i, r) for i, r in enumerate(reasons) if r is not None]


def check_splits(cfg: Any, splits: Any, *, train: bool = True, write_list: bool = True) -> list[int]:
    """Check the images a run will read; the indices of the bad training images to skip.

    Bad files anywhere fail the run with one DatasetError naming the first ones and the count,
    the full list written to OUTPUT_DIR/unreadable_images.txt; with DATALOADER.SKIP_CORRUPT the
    bad training images are returned instead (the loader never draws them and counts them).
    Query, gallery, validation and multi-query images are never skipped: that would change what
    the metrics measure.
    """
    mode = str(cfg.DATALOADER.CHECK_IMAGES)
    parts = ([("train", splits.train)] if train else []) + [("query", splits.query), ("gallery", splits.gallery)]
    # The validation split (training identities held out) and multi-query images, when loaded.
    parts += [(name, records) for name in ("val", "multi_query")
              if (records := getattr(splits, name, None))]
    found = {name: find_unreadable([r[0] for r in records], mode) for name, records in parts}
    total = sum(len(v) for v in found.values())
    n_images = sum(len(records) for _, records in parts)
    if total == 0:
        if mode != "off":
            logger.info("checked %d images (DATALOADER.CHECK_IMAGES %s): all readable", n_images, mode)
        return []
    records = dict(parts)
    rows = [(name, records[name][i][0], why) for name, bad in found.items() for i, why in bad]
    list_path = _write_list(cfg, rows) if write_list else None
    skip = bool(cfg.DATALOADER.SKIP_CORRUPT)
    fatal = [row for row in rows if not (skip and row[0] == "train")]
    where = f"; the full list is in {list_path}" if list_path else ""
    if not fatal:
        logger.warning("DATALOADER.SKIP_CORRUPT: skipping %d unreadable training images of %d (%s%s)",
                       total, len(splits.train), ", ".join(p for _, p, _ in rows[:3]) + (", ..." if total > 3 else ""), where)
        return [i for i, _ in found.get("train", [])]
    shown = "\n".join(f"  {path}: {why}" for _, path, why in fatal[:SHOWN])
    more = f"\n  ... and {len(fatal) - SHOWN} more" if len(fatal) > SHOWN else ""
    by_split = ", ".join(f"{len(v)} {k}" for k, v in found.items() if v)
    if any(name == "train" for name, _, _ in fatal):
        fix = "replace or delete them, or set DATALOADER.SKIP_CORRUPT True to train without them"
    else:
        fix = "replace or delete them (query, gallery and validation images are never skipped)"
    raise DatasetError(
        f"{len(fatal)} of {n_images} images cannot be read ({by_split}; DATALOADER.CHECK_IMAGES "
        f"{mode!r}):\n{shown}{more}\n{fix}{where}."
    )


def _write_list(cfg: Any, rows: list[tuple[str, str, str]]) -> Path:
    out = Path(cfg.OUTPUT_DIR or ".")
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out / LIST_NAME,
                             "".join(f"{split}\t{p}\t{why}\n" for split, p, why in rows))
