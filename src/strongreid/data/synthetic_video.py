"""Synthetic multi-camera footage: the synthetic pedestrians walk through C cameras.

Every person takes a route through two or more cameras, crossing each camera's scene once,
left to right or right to left, in the view (front, back, side) that camera tends to see. The
output is one MOTChallenge-style sequence per camera, so `strongreid gallery ingest` and the
tests need no download:

    OUT/footage.json           people, routes, start time, fps (the ground truth in one file)
    OUT/cam1/video.mp4         the camera's footage (H.264, or MPEG-4 part 2 as a fallback)
    OUT/cam1/seqinfo.ini       MOT sequence info (+ startTime, an ISO-8601 UTC time)
    OUT/cam1/gt/gt.txt         frame,id,left,top,width,height,1,1,visibility (ids agree across cameras)
    OUT/cam1/det/det.txt       frame,-1,left,top,width,height,score,-1,-1,-1 (a jittered detector)

The people are `make_identity(seed, IDENTITY_OFFSET + mot_id)`: the same renderer as the
image data set, but identities outside its 1..9999 range, so a model trained on
`strongreid synth` never saw them. Frames are 320x128 (the camera's whole panorama) and every
frame is drawn from its own random stream, so the files are identical for a seed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from strongreid.data.synthetic import (
    _CH,
    _PANORAMA_W,
    _SS,
    BACK,
    FRONT,
    SIDE,
    _cached_panorama,
    _draw_person,
    _finish,
    _Painter,
    _rng,
    make_camera,
    make_identity,
)
from strongreid.data.synthetic_domains import STREET, Domain, get_domain
from strongreid.errors import StrongReIDError
from strongreid.paths import atomic_path, check_output_path

FRAME_HEIGHT, FRAME_WIDTH = _CH // _SS, _PANORAMA_W // _SS
IDENTITY_OFFSET = 20_000
DEFAULT_PEOPLE, DEFAULT_CAMS, DEFAULT_FRAMES, DEFAULT_FPS = 8, 3, 120, 5.0
DEFAULT_START = "2026-01-05T08:00:00Z"
# A crop box is the person's height / BOX_FILL tall and half as wide: the framing of the
# 128x64 images of the image data set, so a model trained on those sees familiar crops.
BOX_FILL = 0.86
# Rows of gt.txt need this much of the box inside the frame (MOT's visibility column).
MIN_VISIBILITY = 0.6
_TAG_ROUTE, _TAG_FRAME, _TAG_DET = 61, 67, 71
VIEW_NAMES = {FRONT: "front", BACK: "back", SIDE: "side"}


@dataclass(frozen=True)
class Pass:
    """One person crossing one camera: frames [start, start + frames), left to right or back."""

    mot_id: int
    cam: int
    start: int
    frames: int
    direction: int
    view: int
    mirror: int
    height: float  # person height in canvas pixels (the canvas is _SS times the frame)
    top: float


def _check(people: int, cams: int, frames: int, fps: float) -> None:
    if not 1 <= people <= 500:
        raise StrongReIDError(f"synthetic video: --people {people} is out of range; use 1..500")
    if not 2 <= cams <= 9:
        raise StrongReIDError(f"synthetic video: --cams {cams} is out of range; use 2..9")
    if not 0 < fps <= 60:
        raise StrongReIDError(f"synthetic video: --fps {fps} is out of range; use (0, 60]")
    if frames < 2 * _min_cross(fps):
        raise StrongReIDError(
            f"synthetic video: --frames {frames} is too short for a walk through two cameras at "
            f"{fps:g} fps; use at least {2 * _min_cross(fps)}"
        )


def _min_cross(fps: float) -> int:
    # Crossing a scene takes 2-4 s; at least 4 frames so that every pass has several crops.
    return max(4, int(math.ceil(2.0 * fps)))


def plan_passes(people: int, cams: int, frames: int, fps: float, seed: int,
                domain: Domain = STREET) -> list[Pass]:
    """Routes: each person crosses 2..min(cams, 3) distinct cameras, one after another in time."""
    _check(people, cams, frames, fps)
    out: list[Pass] = []
    for mot_id in range(1, people + 1):
        rng = _rng(seed, _TAG_ROUTE, mot_id)
        n = int(rng.integers(2, min(cams, 3) + 1))
        route = [int(c) for c in rng.choice(np.arange(1, cams + 1), n, replace=False)]
        slot = frames // n
        for j, cam in enumerate(route):
            camera = make_camera(seed, cam, domain)
            length = int(min(slot, rng.integers(_min_cross(fps), 2 * _min_cross(fps) + 1)))
            start = j * slot + int(rng.integers(0, slot - length + 1))
            view = int(rng.choice(3, p=camera.view_probs))
            direction = 1 if rng.random() < 0.5 else -1
            # A side view faces the way the person walks; front and back mirror as render() does.
            mirror = direction if view == SIDE else (1 if view == BACK else -1)
            low = min(0.7, domain.scale[0] - 0.02)
            height = _CH * float(np.clip(camera.scale * math.exp(rng.normal(0.0, 0.05)), low, 0.95))
            top = (_CH - height / BOX_FILL) / 2 + (height / BOX_FILL - height) / 2
            top += float(rng.normal(0.0, 0.02 * _CH))
            out.append(Pass(mot_id, cam, start, length, direction, view, mirror, height, top))
    return out


def _centre_x(p: Pass, frame: int) -> float:
    """Canvas x of the body axis at `frame` (0-based): from just outside one edge to the other."""
    margin = 0.2 * p.height
    t = (frame - p.start + 0.5) / p.frames
    x0, x1 = -margin, _PANORAMA_W + margin
    return x0 + (x1 - x0) * (t if p.direction > 0 else 1.0 - t)


def box_of(p: Pass, frame: int) -> tuple[float, float, float, float, float]:
    """(left, top, width, height, visibility) of the crop box in frame pixels, unclipped."""
    box_h = p.height / BOX_FILL
    box_w = box_h / 2
    cx = _centre_x(p, frame)
    y0 = p.top - (box_h - p.height) / 2
    left, top = (cx - box_w / 2) / _SS, y0 / _SS
    w, h = box_w / _SS, box_h / _SS
    inside_w = max(0.0, min(left + w, FRAME_WIDTH) - max(left, 0.0))
    inside_h = max(0.0, min(top + h, FRAME_HEIGHT) - max(top, 0.0))
    return left, top, w, h, (inside_w * inside_h) / (w * h)


def render_frame(seed: int, cam: int, frame: int, passes: list[Pass],
                 domain: Domain = STREET) -> Image.Image:
    """Frame `frame` (0-based) of camera `cam`: the scene, then the people far to near."""
    camera = make_camera(seed, cam, domain)
    canvas = Image.fromarray(np.array(_cached_panorama(seed, cam, domain)))
    here = [p for p in passes if p.cam == cam and p.start <= frame < p.start + p.frames]
    for p in sorted(here, key=lambda q: (q.height, q.mot_id)):
        ident = make_identity(seed, IDENTITY_OFFSET + p.mot_id, domain)
        # The limbs' pose comes from a per-frame stream: the walk animates.
        rng = _rng(seed, _TAG_FRAME, p.mot_id, cam, frame)
        _draw_person(_Painter(canvas, _centre_x(p, frame), p.top, p.height, p.mirror,
                              camera.foreshorten), ident, p.view, rng)
    return _finish(canvas, camera, _rng(seed, _TAG_FRAME, 0, cam, frame))


def _gt_rows(passes: list[Pass], cam: int) -> list[tuple[int, int, float, float, float, float, float]]:
    rows = []
    for p in passes:
        if p.cam != cam:
            continue
        for f in range(p.start, p.start + p.frames):
            left, top, w, h, vis = box_of(p, f)
            if vis >= MIN_VISIBILITY:
                rows.append((f + 1, p.mot_id, left, top, w, h, vis))
    return sorted(rows)


def _det_rows(rows, seed: int, cam: int) -> list[tuple[int, float, float, float, float, float]]:
    """A detector's view of the ground truth: boxes jittered by a few pixels, scores, misses."""
    rng = _rng(seed, _TAG_DET, cam)
    out = []
    for frame, _mot, left, top, w, h, vis in rows:
        if rng.random() < 0.05:
            continue
        jl, jt = rng.normal(0.0, 0.03 * w), rng.normal(0.0, 0.02 * h)
        scale = math.exp(rng.normal(0.0, 0.03))
        score = float(np.clip(0.55 + 0.4 * vis + rng.normal(0.0, 0.05), 0.05, 0.99))
        out.append((frame, left + jl, top + jt, w * scale, h * scale, score))
    return out


def write_video(path: Path, frames, fps: float) -> str:
    """Encodes RGB PIL frames with PyAV: H.264 where the FFmpeg build has it, else MPEG-4."""
    try:
        import av
    except ImportError as exc:
        raise StrongReIDError("synthetic video needs PyAV: pip install 'strongreid[search]'") from exc

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    # PyAV picks the container by the name: the temporary file ends in .mp4 too. A failed
    # encode leaves no partial file behind.
    with atomic_path(path, keep_suffix=True) as tmp:
        return _encode(tmp, frames, fps, codec)


def _encode(tmp: Path, frames, fps: float, codec: str) -> str:
    from fractions import Fraction

    import av

    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = FRAME_WIDTH, FRAME_HEIGHT, "yuv420p"
        if codec == "libx264":
            # Near-lossless and every 10th frame a keyframe: crops stay close to the render.
            stream.options = {"crf": "16", "g": "10", "preset": "veryfast"}
        else:
            stream.bit_rate = 2_000_000
        for img in frames:
            # Converted here with one scaler thread, so the encoder has nothing to convert: its
            # own scaler would run FFmpeg threads, and a process forked before that scaler is
            # freed (a DataLoader worker) can hang freeing its copy. Same pixels either way.
            frame = av.VideoFrame.from_image(img).reformat(format="yuv420p", threads=1)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def parse_start(start: str) -> datetime:
    """An ISO-8601 time (Z or an offset; naive means UTC) as an aware UTC datetime."""
    try:
        t = datetime.fromisoformat(start.replace("Z", "+00:00"))
    except ValueError:
        raise StrongReIDError(
            f"start time {start!r} is not ISO-8601; write it like {DEFAULT_START}"
        ) from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC)


def generate_footage(
    out: str | os.PathLike,
    people: int = DEFAULT_PEOPLE,
    cams: int = DEFAULT_CAMS,
    frames: int = DEFAULT_FRAMES,
    fps: float = DEFAULT_FPS,
    seed: int = 0,
    start: str = DEFAULT_START,
    domain: str | Domain = "street",
) -> dict:
    """Writes the footage under `out` (see the module docstring) and returns footage.json."""
    look = domain if isinstance(domain, Domain) else get_domain(domain)
    t0 = parse_start(start)
    passes = plan_passes(people, cams, frames, fps, seed, look)
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise StrongReIDError(f"synthetic video: {root} exists and is not an empty folder; "
                              "delete it or choose another --out")
    check_output_path(root, "--out", folder=True)  # before any frame is rendered
    root.mkdir(parents=True, exist_ok=True)
    stamp = t0.strftime("%Y-%m-%dT%H:%M:%SZ")
    codec = ""
    for cam in range(1, cams + 1):
        seq = root / f"cam{cam}"
        gt = _gt_rows(passes, cam)
        _write_lines(seq / "gt" / "gt.txt", [
            f"{f},{i},{left:.2f},{top:.2f},{w:.2f},{h:.2f},1,1,{vis:.3f}"
            for f, i, left, top, w, h, vis in gt])
        _write_lines(seq / "det" / "det.txt", [
            f"{f},-1,{left:.2f},{top:.2f},{w:.2f},{h:.2f},{s:.3f},-1,-1,-1"
            for f, left, top, w, h, s in _det_rows(gt, seed, cam)])
        _write_lines(seq / "seqinfo.ini", [
            "[Sequence]", f"name=cam{cam}", "imDir=img1", f"frameRate={fps:g}",
            f"seqLength={frames}", f"imWidth={FRAME_WIDTH}", f"imHeight={FRAME_HEIGHT}",
            "imExt=.jpg", f"startTime={stamp}"])
        codec = write_video(seq / "video.mp4",
                            (render_frame(seed, cam, f, passes, look) for f in range(frames)), fps)
    manifest = {
        "seed": seed, "people": people, "cams": cams, "frames": frames, "fps": fps,
        "start": stamp, "frame_size": [FRAME_HEIGHT, FRAME_WIDTH], "codec": codec,
        "identity_offset": IDENTITY_OFFSET,
        # the street's footage.json stays as it always was
        **({"domain": look.name} if look.stream is not None else {}),
        "passes": [
            {**asdict(p), "camera": f"cam{p.cam}", "view": VIEW_NAMES[p.view],
             "start_time": (t0 + timedelta(seconds=p.start / fps)).isoformat().replace("+00:00", "Z")}
            for p in passes
        ],
    }
    (root / "footage.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def synth_video_command(out: str, people: int, cams: int, frames: int, fps: float, seed: int,
                        start: str, domain: str = "street") -> int:
    """`strongreid synth-video --out data/footage`: the footage and its ground truth."""
    m = generate_footage(out, people, cams, frames, fps, seed, start, domain)
    crossings = len(m["passes"])
    print(f"{m['cams']} cameras x {m['frames']} frames at {m['fps']:g} fps ({m['codec']}): "
          f"{m['people']} people, {crossings} camera crossings, written to {out}")
    return 0
