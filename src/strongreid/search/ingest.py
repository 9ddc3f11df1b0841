"""`strongreid gallery ingest`: crops and video detections, embedded, into the gallery store.

Sources:
  * a folder of crops (recursive). Market/Duke/MSMT names give the camera (`c1`...), the
    identity and the frame (timestamp = frame / MARKET_FPS within the sequence); with
    `--meta file.csv` (columns `path,camera,timestamp` and optionally `video,frame,track,pid`,
    paths relative to the folder, timestamp in seconds or ISO-8601) any folder works;
  * a folder of MOTChallenge sequences: every sub-folder holding a video file (video.mp4 or
    any .mp4/.avi/.mkv/.mov/.webm) with `gt/gt.txt` or `det/det.txt` (frame,id,left,top,w,h,
    score,...). The camera is the sequence's folder name; the timestamp is seqinfo.ini's
    startTime (or --start-time) + (frame - 1) / frameRate. Videos are decoded with PyAV.

Every crop has a content key, the sha1 of what it is: the image file's bytes for a crop, or
(the video file's sha1, frame, box, track) for a detection. The key is the row's primary key,
so a re-run skips what is stored (before any decoding or embedding) and an interrupted run
resumes where it stopped without duplicates: rows are written batch by batch, each batch's
thumbnails before its rows.

The gallery records the model that wrote it (model_identity.py): an ingest with another model
is refused before anything is read or written.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from strongreid.data.footage import (
    MIN_BOX,
    VIDEO_EXTENSIONS,
    CameraSequence,
    decode_boxes,
    find_sequences,
    parse_time,
    read_mot,
)
from strongreid.deploy.extractor import FeatureExtractor, list_images, parse_pid_camid
from strongreid.errors import DatasetError, StrongReIDError
from strongreid.paths import atomic_write
from strongreid.search.model_identity import (
    ModelIdentity,
    bind_first_write,
    check_ingest,
    model_identity,
)
from strongreid.search.store import KEY_RE, GalleryStore, open_store, thumbs_dir_for

logger = logging.getLogger("strongreid")

# The footage readers live in data.footage; these names stay importable from here.
__all__ = ["MIN_BOX", "VIDEO_EXTENSIONS", "CameraSequence", "find_sequences", "parse_time",
           "read_mot", "decode_crops", "ingest", "ingest_command", "thumb_path", "video_items"]

MARKET_FPS = 25.0  # Market-1501 frame numbers count 25 fps video frames
THUMB_HEIGHT = 128
BATCH = 256


@dataclass
class Item:
    """One crop to store: its content key, its metadata, and how to get its pixels."""

    key: str
    meta: dict[str, Any]
    load: Callable[[], Image.Image] | None = field(default=None, repr=False)


@dataclass
class IngestStats:
    """What one ingest did."""

    seen: int = 0
    skipped: int = 0
    added: int = 0
    seconds: float = 0.0
    note: str | None = None  # e.g. that the gallery adopted this model (it recorded none)

    @property
    def rate(self) -> float:
        """Crops embedded and stored per second."""
        return self.added / self.seconds if self.seconds > 0 else 0.0


def _sha1_file(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def thumb_path(thumbs: Path, key: str) -> Path:
    """Where the thumbnail of `key` lives: two-level fan-out keeps folders small."""
    if not KEY_RE.match(key):
        raise StrongReIDError(f"not a gallery key: {key!r}")
    return thumbs / key[:2] / f"{key}.jpg"


def write_thumbnail(thumbs: Path, key: str, crop: Image.Image) -> None:
    """A JPEG THUMB_HEIGHT pixels tall, written atomically (a crash leaves none, not half)."""
    out = thumb_path(thumbs, key)
    if out.is_file():
        return
    w = max(1, round(crop.width * THUMB_HEIGHT / max(1, crop.height)))
    img = crop.convert("RGB").resize((w, THUMB_HEIGHT), Image.Resampling.BILINEAR)
    # One per crop, in the ingest loop: not fsync'ed (as before).
    atomic_write(out, lambda f: img.save(f, "JPEG", quality=88), durable=False)


# -- crop folders ------------------------------------------------------------------------------


def _read_meta_csv(path: Path) -> dict[str, dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read the metadata CSV {path}: {exc}") from None
    if not rows or not {"path", "camera", "timestamp"} <= set(rows[0]):
        raise DatasetError(f"{path} needs a header with path,camera,timestamp (optionally "
                           "video,frame,track,pid) and at least one row")
    return {Path(r["path"]).as_posix(): r for r in rows}


def _int(value: Any, where: str, default: int = -1) -> int:
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"{where}: {value!r} is not an integer") from None


def crop_items(folder: str | os.PathLike, meta_csv: str | os.PathLike | None = None) -> list[Item]:
    """Items of a crop folder (see the module docstring)."""

    root = Path(folder)
    paths = list_images(root, "--crops")
    table = _read_meta_csv(Path(meta_csv)) if meta_csv else None
    items = []
    for p in paths:
        rel = Path(p).relative_to(root).as_posix()
        if table is not None:
            row = table.get(rel)
            if row is None:
                raise DatasetError(f"{meta_csv} has no row for {rel}: list every image of {root}")
            where = f"{meta_csv} row {rel}"
            if not (row.get("camera") or "").strip():
                # A crop without a camera could never be filtered or grouped on the timeline.
                raise DatasetError(f"{where}: the camera is empty; every row needs one")
            meta = {"camera": row["camera"].strip(), "timestamp": parse_time(row["timestamp"], where),
                    "video": row.get("video") or "", "frame": _int(row.get("frame"), where),
                    "track": _int(row.get("track"), where), "pid": _int(row.get("pid"), where)}
        else:
            pid, camid = parse_pid_camid(p)
            if camid < 0:
                raise DatasetError(
                    f"{p}: the camera cannot be read from the name (Market-style "
                    "0002_c1s1_000451_03.jpg); pass --meta FILE.csv with path,camera,timestamp")
            parts = Path(p).stem.split("_")
            frame = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1
            meta = {"camera": f"c{camid + 1}", "timestamp": max(frame, 0) / MARKET_FPS,
                    "video": "", "frame": frame, "track": -1, "pid": pid}
        meta["source"] = rel
        items.append(Item(_sha1_file(Path(p)), meta, _image_loader(p)))
    return items


def _image_loader(path: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from strongreid.data import read_image

        return read_image(path)
    return load


# -- MOT sequences -----------------------------------------------------------------------------


def video_items(seq: CameraSequence, root: Path, frame_step: int = 1, min_score: float = 0.0) -> list[Item]:
    """Items of a sequence's detections (no pixels yet: decode_crops fills them in)."""
    vhash = _sha1_file(seq.video)
    rel = seq.video.relative_to(root).as_posix() if seq.video.is_relative_to(root) else seq.video.name
    items = []
    for frame, tid, left, top, w, h, score in seq.rows:
        if (frame - 1) % frame_step or score < min_score or w < MIN_BOX or h < MIN_BOX:
            continue
        box = (round(left), round(top), round(w), round(h))
        key = hashlib.sha1(f"{vhash}|{frame}|{box}|{tid}".encode()).hexdigest()
        items.append(Item(key, {
            "camera": seq.name, "video": rel, "source": rel, "frame": frame,
            "timestamp": seq.start + (frame - 1) / seq.fps, "left": box[0], "top": box[1],
            "width": box[2], "height": box[3], "track": tid, "score": score, "pid": -1,
        }))
    return items


def decode_crops(video: Path, items: Sequence[Item]) -> Iterator[tuple[Item, Image.Image]]:
    """Decodes `video` once, front to back, and cuts each item's box (clipped to the frame)."""
    return decode_boxes(video, ((it, int(it.meta["frame"]), (it.meta["left"], it.meta["top"],
                                                             it.meta["width"], it.meta["height"]))
                                for it in items))


# -- the ingest loop ---------------------------------------------------------------------------


def _batches(pairs: Iterator[tuple[Item, Image.Image]], size: int):
    batch: list[tuple[Item, Image.Image]] = []
    for pair in pairs:
        batch.append(pair)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _store_batch(store: GalleryStore, embed: Callable[[list[Image.Image]], Any], thumbs: Path,
                 batch: list[tuple[Item, Image.Image]],
                 before_write: Callable[[], None] | None = None) -> int:
    feats = np.asarray(embed([crop for _, crop in batch]), np.float32)
    if store.dim is None:
        store.open(int(feats.shape[1]))
    if before_write is not None:  # the first batch: the gallery records the model
        before_write()
    for it, crop in batch:
        write_thumbnail(thumbs, it.key, crop)
    store.upsert([{"key": it.key, "vector": f, **it.meta} for (it, _), f in zip(batch, feats)])
    return len(batch)


def check_options(frame_step: int = 1, min_score: float = 0.0, start_time: str | None = None,
                  batch_size: int = BATCH) -> None:
    """The ingest options a user gives, checked before anything is opened or created."""
    if frame_step < 1 or batch_size < 1:
        raise StrongReIDError(f"--frame-step ({frame_step}) and --batch ({batch_size}) must be >= 1")
    if not 0.0 <= min_score <= 1.0:
        raise StrongReIDError(f"--min-score {min_score} must be within [0, 1] (detection "
                              "scores are confidences; 0 keeps every detection)")
    if start_time is not None:
        try:
            start = parse_time(str(start_time), "--start-time")
        except DatasetError:
            start = float("nan")
        if not np.isfinite(start):
            raise StrongReIDError(
                f"--start-time {start_time!r} is neither a finite number of seconds nor an "
                "ISO-8601 time (e.g. 2026-01-05T08:00:00Z); or leave --start-time out to use "
                "each sequence's seqinfo.ini startTime (else 0)")


def ingest(store: GalleryStore, embed: Callable[[list[Image.Image]], Any], thumbs: str | os.PathLike,
           *, crops: Sequence[str] = (), meta_csv: str | None = None, videos: Sequence[str] = (),
           detections: str = "auto", frame_step: int = 1, min_score: float = 0.0,
           start_time: str | None = None, batch_size: int = BATCH, progress: bool | None = None,
           on_progress: Callable[[int, int], None] | None = None,
           model: ModelIdentity | None = None, gallery: str | None = None) -> IngestStats:
    """Embeds and stores every crop of `crops` folders and `videos` MOT folders not yet stored.

    `embed(list of PIL crops) -> (N, D)` is a FeatureExtractor (or any callable like it);
    `on_progress(done, total)` hears of every batch (the service's ingest jobs). `model`: the
    identity of the model behind `embed` (model_identity.py; by default a FeatureExtractor's
    own): a gallery that records another model is refused before anything is read or written,
    a new one records it with its first rows, and one that records none adopts it
    (`stats.note` says so). A plain callable with no `model` is not checked. `gallery`: the
    gallery's name in messages (default the store's URI).
    """
    from tqdm import tqdm

    check_options(frame_step, min_score, start_time, batch_size)
    thumbs = Path(thumbs)
    t0 = time.perf_counter()
    stats = IngestStats()
    if model is None and isinstance(embed, FeatureExtractor):
        model = model_identity(embed)
    name = gallery or str(getattr(store, "uri", "the gallery"))
    adopt = check_ingest(store, model, name) if model is not None else None
    # (video or None, items): crop folders first, then one entry per sequence.
    work: list[tuple[Path | None, list[Item]]] = [(None, crop_items(f, meta_csv)) for f in crops]
    for folder in videos:
        for seq in find_sequences(folder, detections, start_time):
            work.append((seq.video, video_items(seq, Path(folder), frame_step, min_score)))
    # The inputs exist: an old gallery adopts the model now; a new one with its first rows.
    unbound = model is not None
    if adopt is not None and model is not None:
        bind_first_write(store, model, name)
        stats.note, unbound = adopt, False

    def bind() -> None:
        nonlocal unbound
        if unbound and model is not None:
            bind_first_write(store, model, name)
            unbound = False
    total = sum(len(items) for _, items in work)
    bar = tqdm(total=total, desc="ingest", unit="crop", disable=progress is False or None,
               file=sys.stderr)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        bar.update(n)
        if on_progress is not None:
            on_progress(done, total)

    advance(0)
    try:
        for video, items in work:
            stats.seen += len(items)
            have = store.existing([it.key for it in items])
            todo = [it for it in items if it.key not in have]
            # The same content twice in one run (a copied file) is embedded once, as the
            # first in file order.
            first: dict[str, Item] = {}
            for it in todo:
                first.setdefault(it.key, it)
            todo = list(first.values())
            stats.skipped += len(items) - len(todo)
            advance(len(items) - len(todo))
            if not todo:
                continue
            pairs = decode_crops(video, todo) if video is not None else \
                ((it, it.load()) for it in todo)
            for batch in _batches(pairs, batch_size):
                stats.added += _store_batch(store, embed, thumbs, batch, bind)
                advance(len(batch))
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - t0
    return stats


def ingest_command(gallery: str, model: str, config: str | None = None, device: str = "auto",
                   token: str = "", thumbs: str | None = None, crops: Sequence[str] = (),
                   meta: str | None = None, videos: Sequence[str] = (), detections: str = "auto",
                   frame_step: int = 1, min_score: float = 0.0, start_time: str | None = None,
                   batch: int = 256, index_type: str | None = None) -> int:
    """`strongreid gallery ingest --gallery gallery.db --model best.pt --crops DIR --videos DIR`."""
    if not crops and not videos:
        raise StrongReIDError("nothing to ingest: pass --crops DIR and/or --videos DIR")
    # Before the model is loaded or the gallery opened (or created): a bad option costs nothing.
    check_options(frame_step, min_score, start_time, batch)
    # faiss (imported on the way by the evaluation package) announces its SIMD build at INFO.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    extractor = FeatureExtractor(config, model, device=device)
    store = open_store(gallery, token=token or "", index_type=index_type)
    try:
        stats = ingest(store, extractor, thumbs_dir_for(gallery, thumbs), crops=crops or (),
                       meta_csv=meta, videos=videos or (), detections=detections,
                       frame_step=frame_step, min_score=min_score, start_time=start_time,
                       batch_size=batch, gallery=gallery)
        total = store.count()
    finally:
        store.close()
    if stats.note:
        print(stats.note)
    print(f"{stats.added} crops added, {stats.skipped} already stored ({stats.seen} seen) in "
          f"{stats.seconds:.1f} s ({stats.rate:.1f} crops/s); the gallery {gallery} holds "
          f"{total}")
    return 0
