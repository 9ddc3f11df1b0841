"""MOTChallenge footage on disk: sequences, their box tables, and their frames.

One sequence per camera: a folder holding a video (video.mp4 or any .mp4/.avi/.mkv/.mov/.webm)
or, where allowed, an `img1/` folder of numbered frames (000001.jpg ...), with `gt/gt.txt`
and/or `det/det.txt` (frame,id,left,top,width,height,score,...) and optionally `seqinfo.ini`
(frameRate, startTime). `strongreid synth-video` writes this layout; `strongreid gallery
ingest` (search) and `strongreid tracklets` read it through this module. Videos are decoded
with PyAV, front to back, once.
"""

from __future__ import annotations

import configparser
import contextlib
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from PIL import Image

from strongreid.errors import DatasetError, StrongReIDError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
MIN_BOX = 8  # pixels: smaller detections carry no identity

# (frame, id, left, top, width, height, score)
MotRow = tuple[int, int, float, float, float, float, float]
Box = tuple[int, int, int, int]
T = TypeVar("T")


@dataclass
class CameraSequence:
    """One camera's MOT sequence: its video (or img1/ frame folder), its box rows and its clock."""

    name: str
    video: Path
    rows: list[MotRow]
    fps: float
    start: float
    table: Path | None = None
    length: int = 0  # seqinfo.ini's seqLength; 0 when it does not say


def parse_time(value: str, where: str) -> float:
    """Seconds: a number, or an ISO-8601 time (UTC when it has no offset) as Unix time."""
    value = value.strip()
    with contextlib.suppress(ValueError):
        return float(value)
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise DatasetError(f"{where}: timestamp {value!r} is neither seconds nor ISO-8601 "
                           "(e.g. 2026-01-05T08:00:00Z)") from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def video_in(folder: Path, frames: bool = False) -> Path | None:
    """The footage of a sequence folder: its video file, else (with `frames`) its img1/ folder."""
    named = folder / "video.mp4"
    if named.is_file():
        return named
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS
                   and p.is_file())
    if found:
        return found[0]
    img1 = folder / "img1"
    return img1 if frames and img1.is_dir() else None


def read_mot(path: Path) -> list[MotRow]:
    """(frame, id, left, top, width, height, score) rows of a MOT gt.txt / det.txt.

    In gt.txt the 7th column is the 'consider' flag: rows with 0 are left out, as the MOT
    evaluation does.
    """
    rows = []
    is_gt = path.name == "gt.txt"
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not UTF-8 text; expected MOT lines "
                           "frame,id,left,top,width,height[,score,...]") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        cols = line.strip().split(",")
        try:
            frame, tid = int(float(cols[0])), int(float(cols[1]))
            left, top, w, h = (float(c) for c in cols[2:6])
            score = float(cols[6]) if len(cols) > 6 else 1.0
        except (ValueError, IndexError, OverflowError):
            raise DatasetError(f"{path} line {n}: expected frame,id,left,top,width,height"
                               f"[,score,...], got {line.strip()!r}") from None
        if not all(math.isfinite(v) for v in (left, top, w, h, score)):
            raise DatasetError(f"{path} line {n}: the box and score must be finite numbers, "
                               f"got {line.strip()!r}")
        if is_gt and score == 0:
            continue
        if frame < 1:
            raise DatasetError(f"{path} line {n}: frames count from 1, got {frame}")
        rows.append((frame, tid, left, top, w, h, score))
    return rows


def find_sequences(folder: str | os.PathLike, detections: str = "auto",
                   start_time: str | None = None, frames: bool = False) -> list[CameraSequence]:
    """MOT sequences under `folder` (itself one, or its sub-folders), sorted by name.

    `frames` also accepts sequences whose footage is an img1/ folder of frames instead of a video.
    """
    root = Path(folder)
    if detections not in ("auto", "gt", "det"):
        raise StrongReIDError(f"--detections {detections!r}: use auto, gt or det")
    if not root.is_dir():
        raise DatasetError(f"the footage folder {root} does not exist (or is not a folder); "
                           "give the folder `strongreid synth-video` or a MOT download wrote")
    candidates = [root] if video_in(root, frames) else sorted(p for p in root.iterdir() if p.is_dir())
    seqs = []
    for d in candidates:
        video = video_in(d, frames)
        if video is None:
            continue
        gt, det = d / "gt" / "gt.txt", d / "det" / "det.txt"
        table = {"gt": gt, "det": det, "auto": gt if gt.is_file() else det}[detections]
        if not table.is_file():
            raise DatasetError(f"{d}: no {table.relative_to(d)} beside {video.name}; give the "
                               "detections in MOT format (frame,id,left,top,width,height,score)")
        info = configparser.ConfigParser()
        try:
            info.read(d / "seqinfo.ini", encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError) as exc:
            raise DatasetError(f"{d / 'seqinfo.ini'} is not a MOT seqinfo.ini ([Sequence] "
                               f"frameRate=..., seqLength=...): {exc}") from None
        sec = info["Sequence"] if info.has_section("Sequence") else {}
        try:
            fps = float(sec.get("frameRate", 0) or 0) or _video_fps(video)
            length = int(sec.get("seqLength", 0) or 0)
        except ValueError as exc:
            raise DatasetError(f"{d / 'seqinfo.ini'}: frameRate and seqLength must be numbers "
                               f"({exc})") from None
        start = start_time if start_time is not None else sec.get("startTime", "0")
        seqs.append(CameraSequence(d.name, video, read_mot(table), fps,
                                   parse_time(start, f"{d / 'seqinfo.ini'} startTime"),
                                   table, length))
    if not seqs:
        what = "a video (video.mp4, .avi, .mkv, ...)" + (" or img1/ frames" if frames else "")
        raise DatasetError(f"no MOT sequence under {root}: expected folders holding {what} "
                           "and gt/gt.txt or det/det.txt")
    return seqs


def _av():
    try:
        import av
    except ImportError as exc:
        raise StrongReIDError("reading videos needs PyAV: pip install 'strongreid[search]'") from exc
    return av


def _video_fps(video: Path) -> float:
    if video.is_dir():
        return 25.0  # MOTChallenge's usual rate, for an img1/ folder without seqinfo.ini
    av = _av()
    try:
        with av.open(str(video)) as c:
            rate = c.streams.video[0].average_rate
    except (av.error.FFmpegError, IndexError) as exc:
        raise DatasetError(f"cannot open the video {video}: {exc}") from None
    return float(rate) if rate else 25.0


_DIGITS = re.compile(r"\d+")


def _frame_files(folder: Path) -> list[tuple[int, Path]]:
    """(frame number, file) of an img1/ folder: the number is the name's digits (000001.jpg)."""
    out = []
    for p in folder.iterdir():
        digits = _DIGITS.fullmatch(p.stem)
        if p.suffix.lower() in FRAME_EXTENSIONS and digits is not None:
            out.append((int(p.stem), p))
    return sorted(out)


def frame_size(video: Path) -> tuple[int, int]:
    """(width, height) of the footage's frames, read from the stream header or the first frame."""
    if video.is_dir():
        files = _frame_files(video)
        if not files:
            raise DatasetError(f"{video} holds no numbered frames (000001.jpg ...)")
        try:
            with Image.open(files[0][1]) as img:
                return img.size
        except OSError as exc:
            raise DatasetError(f"cannot read the frame {files[0][1]}: {exc}") from None
    av = _av()
    try:
        with av.open(str(video)) as c:
            stream = c.streams.video[0]
            return int(stream.width), int(stream.height)
    except (av.error.FFmpegError, IndexError) as exc:
        raise DatasetError(f"cannot open the video {video}: {exc}") from None


def iter_frames(video: Path, last: int | None = None) -> Iterator[tuple[int, Image.Image]]:
    """(1-based frame number, RGB image) of a video or an img1/ folder, in order, up to `last`."""
    if video.is_dir():
        for index, path in _frame_files(video):
            if last is not None and index > last:
                return
            try:
                with Image.open(path) as img:
                    yield index, img.convert("RGB")
            except OSError as exc:
                raise DatasetError(f"cannot read the frame {path}: {exc}") from None
        return
    av = _av()
    try:
        container = av.open(str(video))
    except av.error.FFmpegError as exc:
        raise DatasetError(f"cannot open the video {video}: {exc}") from None
    with container:
        try:
            for index, frame in enumerate(container.decode(video=0), 1):
                if last is not None and index > last:
                    return
                # One scaler thread: PyAV keeps each thread's scaler (and FFmpeg's threads
                # behind it) for the thread's life, and a process forked while this thread
                # lives (a DataLoader worker) frees that copy and waits forever on threads it
                # does not have. The conversion is one small frame; its threads bought nothing.
                yield index, frame.to_image(threads=1)
        except av.error.FFmpegError as exc:
            raise DatasetError(f"cannot decode the video {video}: {exc}") from None


def clip_box(box: Box, width: int, height: int) -> Box | None:
    """(left, top, width, height) cut to the frame; None when under MIN_BOX pixels either way."""
    left, top, w, h = box
    x0, y0 = max(0, left), max(0, top)
    x1, y1 = min(width, left + w), min(height, top + h)
    if x1 - x0 < MIN_BOX or y1 - y0 < MIN_BOX:
        return None
    return x0, y0, x1 - x0, y1 - y0


def decode_boxes(video: Path, wanted: Iterable[tuple[T, int, Box]]) -> Iterator[tuple[T, Image.Image]]:
    """Decodes `video` once, front to back, and cuts each (key, frame, box), clipped to the frame.

    Boxes under MIN_BOX pixels once clipped are skipped; footage that ends before a frame
    some box names is an error.
    """
    by_frame: dict[int, list[tuple[T, Box]]] = {}
    for key, frame, box in wanted:
        by_frame.setdefault(int(frame), []).append((key, box))
    last = max(by_frame, default=0)
    if not by_frame:
        return
    for index, img in iter_frames(video, last):
        boxes = by_frame.pop(index, None)
        if not boxes:
            continue
        for key, box in boxes:
            clipped = clip_box(box, img.width, img.height)
            if clipped is not None:
                x0, y0, w, h = clipped
                yield key, img.crop((x0, y0, x0 + w, y0 + h))
    if by_frame:
        first = min(by_frame)
        raise DatasetError(f"{video} ends before frame {first}, which its detections name")
