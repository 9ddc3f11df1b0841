"""`strongreid tracklets`: MOT footage cut into an unlabelled training set of tracklets.

A tracklet is one person's run of boxes in ONE camera: a gt.txt track id (`--boxes gt`), or
det.txt detections linked frame by frame by a motion tracker from BoxMOT (`--boxes det`,
ByteTrack or OC-SORT: no appearance model, no weights). Every tracklet gets a new id, unique
over all cameras, so no identity ever spans two cameras: that link is what unlabelled
footage lacks and what adaptation has to find. Output:

    OUT/bounding_box_train/{tracklet:06d}_c{camera}s1_{frame:06d}_00.jpg   (camera 1-based)
    OUT/tracklets.csv    image,camera,tracklet,source_track,frame,left,top,width,height,score
    OUT/manifest.json    source, options, the finished sequences and the counts

so the `tracklets` dataset (and any Market-style loader) reads it with pid = tracklet id.
Sequences are cut one at a time, in name order; each is committed (crops, then
tracklets.csv, then manifest.json, each written whole) before the next starts, so an
interrupted run resumes at the first unfinished camera and ends with the same files as an
uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from strongreid.data.footage import (
    CameraSequence,
    clip_box,
    decode_boxes,
    find_sequences,
    frame_size,
    read_mot,
    video_in,
)
from strongreid.errors import DatasetError, StrongReIDError
from strongreid.paths import atomic_write_text

logger = logging.getLogger("strongreid")

TRAIN_FOLDER = "bounding_box_train"
CSV_NAME = "tracklets.csv"
MANIFEST_NAME = "manifest.json"
FORMAT = "strongreid-tracklets/1"
CSV_COLUMNS = ("image", "camera", "tracklet", "source_track", "frame", "left", "top", "width",
               "height", "score")
BOXES = ("gt", "det")
TRACKERS = ("bytetrack", "ocsort")
DEFAULT_TRACKER = "bytetrack"
DEFAULT_PER_TRACKLET, DEFAULT_MIN_LENGTH = 10, 4
JPEG_QUALITY = 95
# The option keys a resumed run must share with the run that started the folder.
OPTION_KEYS = ("source", "boxes", "tracker", "per_tracklet", "min_length", "frame_step",
               "min_score", "sequences")


@dataclass(frozen=True)
class TrackBox:
    """One box of a tracklet: its frame, its box in frame pixels (clipped) and its score."""

    frame: int
    box: tuple[int, int, int, int]
    score: float


@dataclass
class TrackletStats:
    """What one run did."""

    cameras: int = 0
    resumed: int = 0  # cameras a previous run had finished
    tracklets: int = 0
    crops: int = 0
    seconds: float = 0.0


def crop_name(tracklet: int, camera: int, frame: int) -> str:
    """The Market-style file name of a crop: tracklet id as the identity, 1-based camera."""
    return f"{tracklet:06d}_c{camera}s1_{frame:06d}_00.jpg"


def sample_evenly(length: int, count: int) -> list[int]:
    """`min(count, length)` increasing indices into a run of `length`, one per equal segment.

    Each index is the middle of its segment, so one sample is the run's middle, two are its
    quarters, and the choice depends on nothing but the two numbers.
    """
    if length < 0 or count < 1:
        raise ValueError(f"sample_evenly: length {length} must be >= 0 and count {count} >= 1")
    k = min(count, length)
    return [((2 * i + 1) * length) // (2 * k) for i in range(k)]


# -- linking boxes into tracklets --------------------------------------------------------------


def _kept_rows(seq: CameraSequence, frame_step: int, min_score: float):
    return sorted(r for r in seq.rows
                  if (r[0] - 1) % frame_step == 0 and r[6] >= min_score and r[4] > 0 and r[5] > 0)


def link_gt(seq: CameraSequence, frame_step: int = 1, min_score: float = 0.0
            ) -> dict[int, list[tuple[int, float, float, float, float, float]]]:
    """gt.txt's track ids as tracklets: id -> [(frame, left, top, width, height, score)]."""
    tracks: dict[int, list[tuple[int, float, float, float, float, float]]] = {}
    for frame, tid, left, top, w, h, score in _kept_rows(seq, frame_step, min_score):
        run = tracks.setdefault(tid, [])
        if run and run[-1][0] == frame:
            raise DatasetError(f"{seq.table}: track {tid} has two boxes in frame {frame}; a gt "
                               "track id names one person, one box per frame")
        run.append((frame, left, top, w, h, score))
    return tracks


def make_tracker(name: str, fps: float) -> Any:
    """A fresh BoxMOT motion tracker (`bytetrack` or `ocsort`) for footage at `fps`."""
    if name not in TRACKERS:
        raise StrongReIDError(f"--tracker {name!r} is not known; use one of {', '.join(TRACKERS)}")
    try:
        import boxmot
    except ImportError as exc:
        raise StrongReIDError("--boxes det links detections with BoxMOT: "
                              "pip install 'strongreid[tracking]'") from exc
    cls = boxmot.ByteTrack if name == "bytetrack" else boxmot.OcSort
    # BoxMOT announces every tracker it builds at INFO on its own console handler (set up
    # when the class is first imported, so quieted after that).
    logging.getLogger("boxmot").setLevel(logging.WARNING)
    # ByteTrack scales how long it keeps a lost track by the frame rate.
    return cls(frame_rate=max(1, round(fps))) if name == "bytetrack" else cls()


def link_detections(seq: CameraSequence, tracker: str, frame_step: int = 1, min_score: float = 0.0
                    ) -> dict[int, list[tuple[int, float, float, float, float, float]]]:
    """det.txt's detections linked by a motion tracker: track id -> the detections it took.

    The tracker sees every kept frame in order (empty ones too, so lost tracks age); a
    tracklet keeps the detector's own boxes, not the tracker's smoothed ones.
    """
    rows = _kept_rows(seq, frame_step, min_score)
    by_frame: dict[int, list[tuple[float, float, float, float, float]]] = {}
    for frame, _tid, left, top, w, h, score in rows:
        by_frame.setdefault(frame, []).append((left, top, w, h, min(max(score, 0.0), 1.0)))
    last = max([seq.length, *by_frame])
    linker = make_tracker(tracker, seq.fps / frame_step)
    tracks: dict[int, list[tuple[int, float, float, float, float, float]]] = {}
    for frame in range(1, last + 1, frame_step):
        dets = by_frame.get(frame, [])
        array = np.array([(x, y, x + w, y + h, s, 0) for x, y, w, h, s in dets],
                         dtype=np.float32).reshape(-1, 6)
        out = linker.update(array, None)
        # Columns: x1, y1, x2, y2, track id, score, class, index of the detection it took.
        for row in np.asarray(out).reshape(-1, 8):
            index = int(row[7])
            if 0 <= index < len(dets):
                x, y, w, h, s = dets[index]
                tracks.setdefault(int(row[4]), []).append((frame, x, y, w, h, s))
    return tracks


def build_tracklets(seq: CameraSequence, boxes: str, tracker: str | None, frame_step: int,
                    min_score: float, min_length: int, size: tuple[int, int]
                    ) -> list[tuple[int, list[TrackBox]]]:
    """(source track id, boxes) of a sequence's tracklets of at least `min_length` usable boxes,
    ordered by first frame then id. Boxes are rounded and clipped to the frame; those under
    MIN_BOX pixels are dropped before counting."""
    raw = (link_gt(seq, frame_step, min_score) if boxes == "gt"
           else link_detections(seq, tracker or DEFAULT_TRACKER, frame_step, min_score))
    out = []
    for tid, run in raw.items():
        kept = []
        for frame, left, top, w, h, score in sorted(run):
            clipped = clip_box((round(left), round(top), round(w), round(h)), *size)
            if clipped is not None:
                kept.append(TrackBox(frame, clipped, score))
        if len(kept) >= min_length:
            out.append((tid, kept))
    out.sort(key=lambda item: (item[1][0].frame, item[0]))
    return out


# -- the output folder -------------------------------------------------------------------------


def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StrongReIDError(f"{path} is not a tracklets manifest ({exc}); delete {out} or "
                              "choose another --out") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StrongReIDError(f"{path} was not written by `strongreid tracklets`; delete {out} "
                              "or choose another --out")
    return manifest


def _prepare_out(out: Path, options: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The manifest to continue: a fresh one, or the previous run's when its options match."""
    fresh = {"format": FORMAT, **options, "finished": [], "counts": {}, "complete": False}
    if out.exists() and not out.is_dir():
        raise StrongReIDError(f"--out {out} is a file; give a folder for the training set")
    if not out.exists() or not any(out.iterdir()):
        return fresh
    previous = _read_manifest(out)
    if previous is None:
        raise StrongReIDError(f"--out {out} holds other files and no {MANIFEST_NAME}; give an "
                              "empty or new folder (nothing there is deleted)")
    changed = [k for k in OPTION_KEYS if previous.get(k) != options[k]]
    if not changed:
        return previous
    if not overwrite:
        what = "; ".join(f"{k}: {previous.get(k)!r} before, {options[k]!r} now"
                         for k in changed if k != "sequences")
        if "sequences" in changed:
            what += ("; " if what else "") + "the footage's sequences differ"
        raise StrongReIDError(f"--out {out} holds tracklets cut with other options ({what}); "
                              "rerun with the same options to resume, or pass --overwrite to "
                              "cut them again")
    for name in (TRAIN_FOLDER, CSV_NAME, MANIFEST_NAME):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    return fresh


def _discard_unfinished(out: Path, finished: set[int]) -> None:
    """Removes what an interrupted run wrote for cameras its manifest does not list as done."""
    # A write cut short by the interruption (`.NAME.tmp<pid>`; `.NAME.<pid>.tmp` from earlier
    # versions).
    for pattern in (".*.tmp[0-9]*", ".*.tmp"):
        for leftover in out.glob(pattern):
            leftover.unlink(missing_ok=True)
    folder = out / TRAIN_FOLDER
    if folder.is_dir():
        for entry in os.scandir(folder):
            parts = entry.name.split("_")
            camera = parts[1][1:].split("s")[0] if len(parts) > 1 else ""
            if not (camera.isdigit() and int(camera) in finished):
                os.unlink(entry.path)
    path = out / CSV_NAME
    if path.is_file():
        kept = [row for row in _read_csv_rows(path) if int(row["camera"]) in finished]
        _write_csv(path, kept)


def _read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _check_footage(source: Path) -> None:
    """A sequence folder with boxes but no footage is a mistake here, not a folder to skip."""
    if not source.is_dir():
        return  # find_sequences says what is wrong
    for folder in [source, *sorted(p for p in source.iterdir() if p.is_dir())]:
        tables = [t for t in ("gt/gt.txt", "det/det.txt") if (folder / t).is_file()]
        if tables and video_in(folder, frames=True) is None:
            raise DatasetError(f"{folder} holds {tables[0]} but no footage: expected video.mp4 "
                               "(or another .mp4/.avi/.mkv/.mov/.webm) or an img1/ folder of "
                               "frames beside it")


def _cut_camera(seq: CameraSequence, camera: int, size: tuple[int, int], first_id: int, out: Path,
                options: dict[str, Any]) -> list[dict[str, Any]]:
    """Writes one sequence's sampled crops; returns their tracklets.csv rows."""
    tracklets = build_tracklets(seq, options["boxes"], options["tracker"], options["frame_step"],
                                options["min_score"], options["min_length"], size)
    rows: list[dict[str, Any]] = []
    wanted = []
    for n, (tid, run) in enumerate(tracklets):
        tracklet = first_id + n
        for index in sample_evenly(len(run), options["per_tracklet"]):
            tb = run[index]
            name = f"{TRAIN_FOLDER}/{crop_name(tracklet, camera, tb.frame)}"
            left, top, w, h = tb.box
            rows.append({"image": name, "camera": camera, "tracklet": tracklet,
                         "source_track": tid, "frame": tb.frame, "left": left, "top": top,
                         "width": w, "height": h, "score": f"{tb.score:.3f}"})
            wanted.append((name, tb.frame, tb.box))
    written = 0
    for name, crop in decode_boxes(seq.video, wanted):
        crop.save(out / name, "JPEG", quality=JPEG_QUALITY)
        written += 1
    if written != len(wanted):  # boxes are clipped to the frame size read from the footage
        raise DatasetError(f"{seq.video}: {len(wanted) - written} crop(s) fell outside the frames")
    return rows


def cut_tracklets(footage: str | os.PathLike, out: str | os.PathLike, *, boxes: str = "gt",
                  tracker: str | None = None, per_tracklet: int = DEFAULT_PER_TRACKLET,
                  min_length: int = DEFAULT_MIN_LENGTH, frame_step: int = 1,
                  min_score: float = 0.0, overwrite: bool = False,
                  on_camera: Callable[[str, int, int], None] | None = None) -> TrackletStats:
    """Cuts the MOT footage under `footage` into the training set `out` (see the module docstring).

    `on_camera(sequence name, tracklets, crops)` hears of every camera committed.
    """
    t0 = time.perf_counter()
    if boxes not in BOXES:
        raise StrongReIDError(f"--boxes {boxes!r}: use gt (gt.txt's track ids) or det "
                              "(det.txt linked by a tracker)")
    if boxes == "det":
        tracker = tracker or DEFAULT_TRACKER
        if tracker not in TRACKERS:
            raise StrongReIDError(f"--tracker {tracker!r} is not known; use one of "
                                  f"{', '.join(TRACKERS)}")
    elif tracker is not None:
        raise StrongReIDError("--tracker links det.txt detections; with --boxes gt the tracks "
                              "come from gt.txt, so leave --tracker out")
    for key, value in (("--per-tracklet", per_tracklet), ("--min-length", min_length),
                       ("--frame-step", frame_step)):
        if value < 1:
            raise StrongReIDError(f"{key} {value} must be >= 1")
    if not 0.0 <= min_score <= 1.0:
        raise StrongReIDError(f"--min-score {min_score} must be within [0, 1]")
    source = Path(footage).resolve()
    _check_footage(source)
    seqs = find_sequences(source, boxes, frames=True)
    for seq in seqs:
        if not seq.rows:
            raise DatasetError(f"{seq.table} holds no boxes; give MOT lines "
                               "frame,id,left,top,width,height[,score,...]")
    # Every video opens (and says its frame size) before anything is written.
    sizes = [frame_size(seq.video) for seq in seqs]
    options = {"source": str(source), "boxes": boxes, "tracker": tracker,
               "per_tracklet": per_tracklet, "min_length": min_length, "frame_step": frame_step,
               "min_score": min_score,
               "sequences": [{"camera": c, "name": s.name} for c, s in enumerate(seqs, 1)]}
    out = Path(out)
    manifest = _prepare_out(out, options, overwrite)
    (out / TRAIN_FOLDER).mkdir(parents=True, exist_ok=True)
    # The manifest comes first, so a run killed inside its first camera is still ours to resume.
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    finished = {int(f["camera"]) for f in manifest["finished"]}
    _discard_unfinished(out, finished)
    stats = TrackletStats(cameras=len(seqs), resumed=len(finished))
    csv_path = out / CSV_NAME
    rows = _read_csv_rows(csv_path) if csv_path.is_file() else []
    next_id = 1 + sum(int(f["tracklets"]) for f in manifest["finished"])
    for camera, seq in enumerate(seqs, 1):
        if camera in finished:
            continue
        new = _cut_camera(seq, camera, sizes[camera - 1], next_id, out, options)
        count = len({r["tracklet"] for r in new})
        rows.extend(new)
        _write_csv(csv_path, rows)
        manifest["finished"].append({"camera": camera, "name": seq.name, "first_tracklet": next_id,
                                     "tracklets": count, "crops": len(new)})
        next_id += count
        done = manifest["finished"]
        manifest["counts"] = {"cameras": len(done),
                              "tracklets": sum(f["tracklets"] for f in done),
                              "crops": sum(f["crops"] for f in done)}
        manifest["complete"] = len(done) == len(seqs)
        atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
        logger.info("tracklets: %s (camera %d) -> %d tracklets, %d crops", seq.name, camera,
                    count, len(new))
        if on_camera is not None:
            on_camera(seq.name, count, len(new))
    stats.tracklets = manifest["counts"]["tracklets"]
    stats.crops = manifest["counts"]["crops"]
    stats.seconds = time.perf_counter() - t0
    return stats


# -- how pure the tracklets are ---------------------------------------------------------------


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax1, bx1) - max(a[0], b[0]))
    ih = max(0.0, min(ay1, by1) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def crop_people(out: str | os.PathLike, footage: str | os.PathLike,
                min_iou: float = 0.5) -> list[tuple[dict[str, str], int | None]]:
    """Each row of a cut's tracklets.csv with the gt id of the best-overlapping gt box of its
    frame in the footage's gt.txt (IoU >= `min_iou`, else None): who a crop really shows."""
    rows = _read_csv_rows(Path(out) / CSV_NAME)
    names = {int(s["camera"]): s["name"] for s in _read_manifest(Path(out))["sequences"]}
    gt: dict[tuple[int, int], list[tuple[int, tuple[float, float, float, float]]]] = {}
    for camera, name in names.items():
        for frame, tid, left, top, w, h, _ in read_mot(Path(footage) / name / "gt" / "gt.txt"):
            gt.setdefault((camera, frame), []).append((tid, (left, top, w, h)))
    people: list[tuple[dict[str, str], int | None]] = []
    for row in rows:
        camera, box = int(row["camera"]), [float(row[k]) for k in ("left", "top", "width", "height")]
        best, best_iou = None, min_iou
        for tid, gbox in gt.get((camera, int(row["frame"])), []):
            iou = _iou(box, gbox)
            if iou >= best_iou:
                best, best_iou = tid, iou
        people.append((row, best))
    return people


def tracklet_purity(out: str | os.PathLike, footage: str | os.PathLike,
                    min_iou: float = 0.5) -> dict[str, float]:
    """How often a tracklet's crops show one person, against the footage's gt.txt.

    Each crop takes the gt id of the best-overlapping gt box of its frame (IoU >= `min_iou`,
    else none); purity is the share of crops whose id is their tracklet's majority id.
    `fragmentation` is tracklets per (camera, gt id) seen: 1.0 when no person's pass through
    a camera was split.
    """
    people = crop_people(out, footage, min_iou)
    ids: dict[int, list[int | None]] = {}
    pairs: set[tuple[int, int]] = set()
    for row, best in people:
        ids.setdefault(int(row["tracklet"]), []).append(best)
        if best is not None:
            pairs.add((int(row["camera"]), best))
    majority = 0
    for seen in ids.values():
        named = [i for i in seen if i is not None]
        if named:
            majority += max(named.count(i) for i in set(named))
    return {"crops": float(len(people)), "tracklets": float(len(ids)),
            "purity": majority / len(people) if people else 0.0,
            "fragmentation": len(ids) / len(pairs) if pairs else 0.0}


def tracklets_command(footage: str, out: str, boxes: str = "gt", tracker: str | None = None,
                      per_tracklet: int = DEFAULT_PER_TRACKLET,
                      min_length: int = DEFAULT_MIN_LENGTH, frame_step: int = 1,
                      min_score: float = 0.0, overwrite: bool = False) -> int:
    """`strongreid tracklets --footage DIR --out DIR`: the footage as an unlabelled training set."""
    def report(name: str, tracklets: int, crops: int) -> None:
        print(f"{name}: {tracklets} tracklets, {crops} crops", flush=True)

    stats = cut_tracklets(footage, out, boxes=boxes, tracker=tracker, per_tracklet=per_tracklet,
                          min_length=min_length, frame_step=frame_step, min_score=min_score,
                          overwrite=overwrite, on_camera=report)
    resumed = f" ({stats.resumed} finished before, resumed)" if stats.resumed else ""
    print(f"{stats.cameras} cameras{resumed}: {stats.tracklets} tracklets, {stats.crops} crops "
          f"in {stats.seconds:.1f} s, written to {out} (train with DATASETS.NAMES tracklets, "
          f"DATASETS.ROOT_DIR {out})")
    return 0
