"""A synthetic street video for the BoxMOT tests: two of the synthetic pedestrians meet behind a pillar.

Person A walks in from the left, person B from the right; they meet behind a pillar in the middle
of the frame, wait there a moment and each walks back the way it came. A constant-velocity motion
model keeps moving each lost track in its old direction, so after the pillar A's track lies over
B and B's over A: motion alone swaps the identities, appearance can tell them apart.

Detections are the ground truth (no detector weights exist offline): a person's full (amodal)
box whenever at least MIN_VISIBLE of its pixels are visible, i.e. not behind the pillar.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from strongreid.data.synthetic import SIDE, _cached_panorama, _draw_person, _Painter, make_identity

FRAME_H, FRAME_W = 256, 640
PERSON_HEIGHT = 200
SPEED = 4  # pixels a frame
PILLAR = (290, 350)  # x range of the pillar; it is taller than the frame
MIN_VISIBLE = 0.5
WAIT = 8  # frames the two spend behind the pillar before turning back


@dataclass
class Video:
    """Frames (BGR uint8, as OpenCV and BoxMOT use them) and per-frame ground-truth boxes."""

    frames: list[np.ndarray]
    # frame index -> list of (person 0 or 1, x1, y1, x2, y2); only visible people are listed.
    boxes: list[list[tuple[int, int, int, int, int]]]
    pids: tuple[int, int]


def _sprite(seed: int, pid: int, facing: int) -> Image.Image:
    """One pedestrian in side view on a transparent canvas the size of the frame's height."""
    layer = Image.new("RGBA", (PERSON_HEIGHT, FRAME_H), (0, 0, 0, 0))
    rng = np.random.default_rng([seed, pid, 7])
    painter = _Painter(layer, PERSON_HEIGHT / 2, (FRAME_H - PERSON_HEIGHT) / 2, PERSON_HEIGHT, facing)
    _draw_person(painter, make_identity(seed, pid), SIDE, rng)
    return layer.crop(layer.getbbox())


def _track(start: float, towards: int, meet: float, frames: int) -> list[float]:
    """Left x of one walker: in at SPEED towards `meet`, WAIT frames there, back out at SPEED."""
    xs, x, state, waited = [], start, "in", 0
    for _ in range(frames):
        xs.append(x)
        if state == "in":
            x += towards * SPEED
            if (x - meet) * towards >= 0:
                x, state = meet, "wait"
        elif state == "wait":
            waited += 1
            if waited >= WAIT:
                state = "out"
        else:
            x -= towards * SPEED
    return xs


def _colours(sprite: Image.Image) -> np.ndarray:
    """Mean RGB of the upper and of the lower half of a sprite's pixels: what a ReID model sees first."""
    rgba = np.asarray(sprite, np.float64)
    half = rgba.shape[0] // 2
    parts = [rgba[:half], rgba[half:]]
    return np.concatenate([p[p[:, :, 3] > 0][:, :3].mean(axis=0) for p in parts])


def pick_pair(seed: int, pids: list[int]) -> tuple[int, int]:
    """The two identities that look most different: a pair a trained ReID model must separate."""
    looks = {p: _colours(_sprite(seed, p, 1)) for p in pids}
    pairs = [(float(np.linalg.norm(looks[a] - looks[b])), a, b)
             for i, a in enumerate(pids) for b in pids[i + 1:]]
    _, a, b = max(pairs)
    return a, b


def make_video(seed: int, pids: tuple[int, int], frames: int = 90, scene_cam: int = 0) -> Video:
    """Render the scene: background, the two walkers (A in front of B), then the pillar."""
    background = Image.fromarray(np.ascontiguousarray(_cached_panorama(seed, scene_cam))).resize(
        (FRAME_W, FRAME_H)).convert("RGB")
    sprites = [(_sprite(seed, pids[0], 1), _sprite(seed, pids[0], -1)),
               (_sprite(seed, pids[1], -1), _sprite(seed, pids[1], 1))]
    width = max(s.width for pair in sprites for s in pair)
    centre = (PILLAR[0] + PILLAR[1]) / 2
    # They meet with their boxes overlapping, each 10 px off the pillar's centre line.
    paths = [_track(20, 1, centre - 10 - width / 2, frames),
             _track(FRAME_W - 20 - width, -1, centre + 10 - width / 2, frames)]
    out_frames, out_boxes = [], []
    for t in range(frames):
        canvas = background.copy()
        placed = []
        for who in (1, 0):  # B first, so A walks in front of B
            going_out = t > 0 and (paths[who][t] - paths[who][t - 1]) * (1 if who == 0 else -1) < 0
            sprite = sprites[who][1 if going_out else 0]
            x = int(round(paths[who][t]))
            y = (FRAME_H - sprite.height) // 2
            canvas.paste(sprite, (x, y), sprite)
            placed.append((who, x, y, sprite))
        ImageDraw.Draw(canvas).rectangle((PILLAR[0], 0, PILLAR[1] - 1, FRAME_H), fill=(92, 84, 78))
        boxes = []
        for who, x, y, sprite in placed:
            alpha = np.asarray(sprite)[:, :, 3] > 0
            cols = np.arange(x, x + sprite.width)
            hidden = (cols >= PILLAR[0]) & (cols < PILLAR[1])
            visible = alpha[:, ~hidden].sum() / max(alpha.sum(), 1)
            x1, y1 = max(x, 0), y
            x2, y2 = min(x + sprite.width, FRAME_W), y + sprite.height
            if visible >= MIN_VISIBLE and x2 - x1 > sprite.width // 2:
                boxes.append((who, x1, y1, x2, y2))
        out_frames.append(np.ascontiguousarray(np.asarray(canvas)[:, :, ::-1]))
        out_boxes.append(sorted(boxes))
    return Video(out_frames, out_boxes, pids)
