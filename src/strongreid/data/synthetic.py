"""A procedurally rendered pedestrian data set in the Market-1501 layout.

It exists so that the whole pipeline (train, test, export, search) can be run and measured
without downloading anything. The task is built to need a learned model: colours come from
a small shared palette, so many identities wear the same colours, and what tells them apart
is the combination of garment shapes, patterns, bags, hair and body proportions. Cameras
change the viewpoint (a logo is only seen from the front, a backpack mostly from behind),
the colour cast and brightness, blur, noise, background, framing and occlusions.

Every image is drawn from its own random stream derived from (seed, pid, image index), so
the files are byte-identical for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from strongreid.data.synthetic_domains import STREET, Domain, get_domain
from strongreid.errors import StrongReIDError

T = TypeVar("T")

DEFAULT_IDS = 360
DEFAULT_CAMS = 6
DEFAULT_IMAGES_PER_ID = 12
DEFAULT_SEED = 0

IMAGE_HEIGHT, IMAGE_WIDTH = 128, 64
SPLITS = ("bounding_box_train", "query", "bounding_box_test")
MAX_QUERIES_PER_ID = 2

# Scenes are drawn at twice the output size and box-filtered down: cheap anti-aliasing.
_SS = 2
_CH, _CW = IMAGE_HEIGHT * _SS, IMAGE_WIDTH * _SS
_PANORAMA_W = _CW * 5

# Stream tags keep the random streams of identities, cameras, images and the split plan apart.
_TAG_IDENTITY, _TAG_CAMERA, _TAG_IMAGE, _TAG_PLAN, _TAG_DISTRACTOR = 11, 23, 37, 41, 53

# Below this many images the process start-up costs more than it saves.
_PARALLEL_MIN_IMAGES = 400
_CHUNK = 48

RGB = tuple[int, int, int]

CLOTH: dict[str, RGB] = {
    "black": (32, 32, 36),
    "white": (220, 220, 212),
    "grey": (122, 122, 126),
    "navy": (34, 44, 92),
    "red": (160, 38, 42),
    "jeans": (66, 90, 136),
    "khaki": (178, 160, 116),
    "green": (52, 102, 62),
    "yellow": (212, 182, 60),
    "brown": (98, 68, 46),
}
# (name, weight): few colours with a skew towards dark ones, like real street clothing, so
# that a colour combination is shared by many identities.
TOP_COLOURS = [("black", 3), ("white", 2), ("grey", 2), ("navy", 2), ("red", 1), ("green", 1)]
BOTTOM_COLOURS = [("black", 4), ("jeans", 4), ("grey", 2), ("khaki", 1), ("navy", 1)]
SECOND_COLOURS = ["white", "black", "grey", "red", "yellow"]
BAG_COLOURS = ["black", "brown", "grey", "navy"]
SHOE_COLOURS = ["black", "white", "brown"]
SKIN: list[RGB] = [(236, 196, 170), (205, 160, 120), (150, 105, 75), (96, 66, 48)]
HAIR: list[RGB] = [(28, 24, 22), (72, 50, 34), (170, 140, 90), (128, 124, 120)]
BACKGROUND: list[RGB] = [
    (128, 128, 124),
    (160, 152, 140),
    (98, 100, 104),
    (150, 96, 80),
    (110, 128, 118),
    (70, 92, 62),
    (188, 184, 172),
    (84, 80, 76),
    (120, 136, 150),
]

TOP_KINDS = ("tshirt", "longsleeve", "coat")
TOP_PATTERNS = ("plain", "hstripes", "vstripes", "checks", "logo", "yoke")
BOTTOM_KINDS = ("trousers", "shorts", "skirt")
HAIR_STYLES = ("short", "long", "hat")
BAGS = ("none", "backpack", "shoulder", "hand")
FRONT, BACK, SIDE = 0, 1, 2


@dataclass(frozen=True)
class Identity:
    """What stays the same for one person in every camera."""

    build: float
    leg_ratio: float
    head_ratio: float
    skin: RGB
    hair: RGB
    hair_style: str
    hat: RGB
    top_kind: str
    top: RGB
    top_pattern: str
    top_second: RGB
    logo_shape: str
    bottom_kind: str
    bottom: RGB
    bottom_stripe: bool
    bottom_second: RGB
    shoes: RGB
    bag: str
    bag_colour: RGB
    bag_side: int
    scarf: RGB | None


@dataclass(frozen=True)
class Camera:
    """What one camera does to every image it takes."""

    index: int
    gains: tuple[float, float, float]
    brightness: float
    gamma: float
    saturation: float
    blur: float
    noise: float
    quality: int
    view_probs: tuple[float, float, float]
    scale: float
    occlusion: float
    # Domain-specific optics; the defaults are the street's (no effect, no random draws).
    domain: str = "street"
    foreshorten: float = 0.0
    resolution: float = 1.0
    light_pool: float = 0.0
    pool_centre: tuple[float, float] = (0.5, 0.3)


@dataclass(frozen=True)
class Shot:
    """One file to write: who, which camera, which split and under which name."""

    pid: int
    cam: int
    index: int
    split: str
    name: str


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def _jitter(rng: np.random.Generator, colour: RGB, sd: float = 6.0) -> RGB:
    c = np.clip(np.asarray(colour, np.float64) + rng.normal(0.0, sd, 3), 0, 255)
    return (int(c[0]), int(c[1]), int(c[2]))


def _weighted(rng: np.random.Generator, table: list[tuple[str, int]]) -> str:
    weights = np.array([w for _, w in table], np.float64)
    return table[int(rng.choice(len(table), p=weights / weights.sum()))][0]


def _pick(rng: np.random.Generator, items: Sequence[T], p: Sequence[float] | None = None) -> T:
    return items[int(rng.choice(len(items), p=p))]


def _stream(domain: Domain, *keys: int) -> np.random.Generator:
    """The random stream of `keys`, kept apart per domain (the street keeps the original's)."""
    return _rng(*keys) if domain.stream is None else _rng(*keys, domain.stream)


def make_identity(seed: int, pid: int, domain: Domain = STREET) -> Identity:
    """Identity `pid` of data set `seed`; it does not depend on how many ids are generated."""
    rng = _stream(domain, seed, _TAG_IDENTITY, pid)
    top_name = _weighted(rng, list(domain.top_colours))
    bottom_name = _weighted(rng, list(domain.bottom_colours))
    second_top = _pick(rng, [c for c in SECOND_COLOURS if c != top_name])
    second_bottom = _pick(rng, [c for c in SECOND_COLOURS if c != bottom_name])
    hair_style = _pick(rng, HAIR_STYLES, p=list(domain.hair_style_p))
    bottom_kind = _pick(rng, BOTTOM_KINDS, p=list(domain.bottom_kind_p))
    scarf = (_jitter(rng, CLOTH[_pick(rng, SECOND_COLOURS)])
             if rng.random() < domain.scarf_p else None)
    return Identity(
        build=float(rng.uniform(0.82, 1.22)),
        leg_ratio=float(rng.uniform(0.44, 0.52)),
        head_ratio=float(rng.uniform(0.115, 0.145)),
        skin=_jitter(rng, _pick(rng, SKIN)),
        hair=_jitter(rng, _pick(rng, HAIR, p=[0.45, 0.3, 0.15, 0.1])),
        hair_style=hair_style,
        hat=_jitter(rng, CLOTH[_pick(rng, SECOND_COLOURS)]),
        top_kind=_pick(rng, TOP_KINDS, p=None if domain.top_kind_p is None else list(domain.top_kind_p)),
        top=_jitter(rng, CLOTH[top_name]),
        top_pattern=_pick(rng, TOP_PATTERNS),
        top_second=_jitter(rng, CLOTH[second_top]),
        logo_shape=_pick(rng, ("circle", "square", "triangle")),
        bottom_kind=bottom_kind,
        bottom=_jitter(rng, CLOTH[bottom_name]),
        bottom_stripe=bool(rng.random() < 0.35),
        bottom_second=_jitter(rng, CLOTH[second_bottom]),
        shoes=_jitter(rng, CLOTH[_pick(rng, SHOE_COLOURS, p=[0.6, 0.25, 0.15])]),
        bag=_pick(rng, BAGS, p=[0.35, 0.25, 0.2, 0.2]),
        bag_colour=_jitter(rng, CLOTH[_pick(rng, BAG_COLOURS)]),
        bag_side=int(rng.choice([-1, 1])),
        scarf=scarf,
    )


def make_camera(seed: int, cam: int, domain: Domain = STREET) -> Camera:
    """Camera `cam` (1-based) of data set `seed` in `domain`."""
    rng = _stream(domain, seed, _TAG_CAMERA, cam)
    # A colour temperature (red against blue) plus a green tint, as white balance goes wrong.
    temp, tint = rng.normal(*domain.temperature), rng.normal(0.0, domain.tint_sd)
    gains = (math.exp(temp), math.exp(tint), math.exp(-temp))
    main, other = domain.view_p
    probs = np.full(3, other)
    probs[(cam - 1) % 3] = main
    base = dict(
        index=cam,
        gains=gains,
        brightness=float(math.exp(rng.uniform(*domain.log_brightness))),
        gamma=float(rng.uniform(*domain.gamma)),
        saturation=float(rng.uniform(*domain.saturation)),
        blur=float(rng.uniform(*domain.blur)),
        noise=float(rng.uniform(*domain.noise)),
        quality=int(rng.integers(*domain.jpeg_quality)),
        view_probs=(float(probs[0]), float(probs[1]), float(probs[2])),
        scale=float(rng.uniform(*domain.scale)),
        occlusion=float(rng.uniform(*domain.occlusion)),
    )
    if domain.stream is None:
        return Camera(**base)
    # Drawn after everything the street draws, so the street's cameras stay as they were.
    return Camera(
        **base,
        domain=domain.name,
        foreshorten=float(rng.uniform(*domain.foreshorten)),
        resolution=float(rng.uniform(*domain.resolution)),
        light_pool=float(rng.uniform(*domain.light_pool)),
        pool_centre=(float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.15, 0.45))),
    )


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return (
        int(a[0] + (b[0] - a[0]) * t),
        int(a[1] + (b[1] - a[1]) * t),
        int(a[2] + (b[2] - a[2]) * t),
    )


def _panorama(seed: int, cam: int, domain: Domain = STREET) -> np.ndarray:
    """The static scene a camera looks at; each image crops a window of it."""
    if domain.scene == "night":
        return _night_panorama(_stream(domain, seed, _TAG_CAMERA, cam, 1))
    rng = _rng(seed, _TAG_CAMERA, cam, 1)
    wall = _pick(rng, BACKGROUND)
    img = Image.new("RGB", (_PANORAMA_W, _CH), wall)
    d = ImageDraw.Draw(img)
    horizon = int(_CH * rng.uniform(0.45, 0.75))
    d.rectangle([0, horizon, _PANORAMA_W, _CH], fill=_jitter(rng, _pick(rng, BACKGROUND), 10))
    # Shop fronts, doors and signs, some in clothing colours, washed towards the wall colour
    # so that they confuse colour statistics without dominating the frame.
    clutter = [*BACKGROUND, *CLOTH.values()]
    for _ in range(int(rng.integers(5, 12))):
        x0 = int(rng.integers(0, _PANORAMA_W))
        w = int(rng.integers(16, 80))
        y0 = int(rng.integers(0, horizon))
        h = int(rng.integers(12, max(14, horizon - y0 + 20)))
        colour = _mix(_pick(rng, clutter), wall, float(rng.uniform(0.2, 0.6)))
        d.rectangle([x0, y0, x0 + w, y0 + h], fill=_jitter(rng, colour, 10))
    for _ in range(int(rng.integers(1, 4))):
        x0 = int(rng.integers(0, _PANORAMA_W))
        colour = _mix(_pick(rng, clutter), wall, 0.3)
        d.rectangle([x0, 0, x0 + int(rng.integers(4, 12)), horizon + 10], fill=colour)
    for _ in range(int(rng.integers(0, 4))):
        cx, cy = int(rng.integers(0, _PANORAMA_W)), horizon + int(rng.integers(-30, 10))
        r = int(rng.integers(14, 40))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jitter(rng, (56, 92, 50), 14))
    line = _jitter(rng, _pick(rng, BACKGROUND), 20)
    for k in range(int(rng.integers(0, 6))):
        y = horizon + 12 + 22 * k
        d.line([0, y, _PANORAMA_W, y], fill=line, width=2)
    arr = np.asarray(img, np.float32)
    texture = rng.normal(0.0, 5.0, (_CH, _PANORAMA_W, 1)).astype(np.float32)
    return np.clip(arr + texture, 0, 255).astype(np.uint8)


# Night: dark facades, lit shop windows and neon signs, lamp posts, wet asphalt.
_NIGHT_WALLS: list[RGB] = [(34, 36, 48), (44, 40, 42), (28, 32, 36), (52, 48, 44), (38, 44, 56)]
_NIGHT_GROUND: list[RGB] = [(40, 40, 44), (48, 46, 44), (34, 36, 40)]
_WINDOW_LIGHT: list[RGB] = [(255, 214, 150), (250, 236, 200), (206, 224, 255), (255, 190, 120)]
_NEON: list[RGB] = [(255, 60, 120), (60, 220, 255), (120, 255, 110), (255, 120, 40)]


def _night_panorama(rng: np.random.Generator) -> np.ndarray:
    wall = _jitter(rng, _pick(rng, _NIGHT_WALLS), 4)
    img = Image.new("RGB", (_PANORAMA_W, _CH), wall)
    d = ImageDraw.Draw(img)
    horizon = int(_CH * rng.uniform(0.5, 0.72))
    ground = _jitter(rng, _pick(rng, _NIGHT_GROUND), 4)
    d.rectangle([0, horizon, _PANORAMA_W, _CH], fill=ground)
    for _ in range(int(rng.integers(4, 9))):  # lit windows and shop fronts
        x0, w = int(rng.integers(0, _PANORAMA_W)), int(rng.integers(14, 60))
        y0 = int(rng.integers(4, max(6, horizon - 30)))
        h = int(rng.integers(10, max(12, horizon - y0)))
        glow = _mix(_pick(rng, _WINDOW_LIGHT), wall, float(rng.uniform(0.0, 0.35)))
        d.rectangle([x0, y0, x0 + w, y0 + h], fill=_jitter(rng, glow, 6))
        if rng.random() < 0.6:  # mullions
            for k in range(1, int(rng.integers(2, 4))):
                xm = x0 + k * w // 3
                d.line([xm, y0, xm, y0 + h], fill=wall, width=2)
    for _ in range(int(rng.integers(1, 4))):  # neon signs
        x0, y0 = int(rng.integers(0, _PANORAMA_W)), int(rng.integers(4, max(6, horizon // 2)))
        d.rectangle([x0, y0, x0 + int(rng.integers(16, 44)), y0 + int(rng.integers(4, 9))],
                    fill=_pick(rng, _NEON))
    for _ in range(int(rng.integers(1, 3))):  # lamp posts with their glow on the ground
        x = int(rng.integers(0, _PANORAMA_W))
        lamp = _pick(rng, _WINDOW_LIGHT[::3])
        d.ellipse([x - 40, horizon - 6, x + 40, horizon + 26], fill=_mix(lamp, ground, 0.75))
        d.rectangle([x - 2, 6, x + 2, horizon + 8], fill=(22, 22, 24))
        d.ellipse([x - 7, 0, x + 7, 12], fill=lamp)
    for _ in range(int(rng.integers(2, 6))):  # reflections on the wet road
        y = horizon + 10 + int(rng.integers(0, max(1, _CH - horizon - 10)))
        d.line([0, y, _PANORAMA_W, y], fill=_mix(_pick(rng, _WINDOW_LIGHT), ground, 0.85), width=1)
    arr = np.asarray(img, np.float32)
    texture = rng.normal(0.0, 3.0, (_CH, _PANORAMA_W, 1)).astype(np.float32)
    return np.clip(arr + texture, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=18)
def _cached_panorama(seed: int, cam: int, domain: Domain = STREET) -> np.ndarray:
    # Nine cameras of two seeds: a generation run reuses each scene thousands of times.
    scene = _panorama(seed, cam, domain)
    scene.flags.writeable = False
    return scene


def _shade(colour: RGB, f: float) -> RGB:
    return (
        int(min(255, colour[0] * f)),
        int(min(255, colour[1] * f)),
        int(min(255, colour[2] * f)),
    )


class _Painter:
    """Draws in body units: u across (in heights, 0 = body axis), v down (0 = top of head).

    `m` mirrors u: a front view shows the person's right on the image left.
    """

    def __init__(self, canvas: Image.Image, cx: float, y0: float, hp: float, m: int,
                 foreshorten: float = 0.0) -> None:
        self.canvas = canvas
        self.draw = ImageDraw.Draw(canvas)
        self.cx, self.y0, self.hp, self.m = cx, y0, hp, m
        self.f = foreshorten

    def xy(self, u: float, v: float) -> tuple[float, float]:
        if self.f == 0.0:
            return (self.cx + self.m * u * self.hp, self.y0 + v * self.hp)
        # Seen from above: v -> v(1+f)/(1+fv) keeps head top and feet where they were but
        # gives the upper body more of the height, and the shoulders a little more width.
        f = self.f
        widen = 1.0 + 0.3 * f * (1.0 - v)
        return (self.cx + self.m * u * self.hp * widen,
                self.y0 + self.hp * v * (1.0 + f) / (1.0 + f * v))

    def body_v(self, t: np.ndarray) -> np.ndarray:
        """Body height coordinate v of normalised pixel heights t (the inverse of xy's map)."""
        if self.f == 0.0:
            return t
        return t / (1.0 + self.f - self.f * t)

    def box(self, u0: float, v0: float, u1: float, v1: float) -> tuple[float, ...]:
        """Pixel box of a body-unit box, ordered as PIL wants it whatever the mirroring."""
        (x0, y0), (x1, y1) = self.xy(u0, v0), self.xy(u1, v1)
        return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))

    def poly(self, pts, fill: RGB, outline: bool = True) -> None:
        line = _shade(fill, 0.7) if outline else None
        self.draw.polygon([self.xy(u, v) for u, v in pts], fill=fill, outline=line, width=2)

    def ellipse(self, cu: float, cv: float, ru: float, rv: float, fill: RGB) -> None:
        self.draw.ellipse(self.box(cu - ru, cv - rv, cu + ru, cv + rv), fill=fill)

    def rect(self, u0: float, v0: float, u1: float, v1: float, fill: RGB) -> None:
        self.poly([(u0, v0), (u1, v0), (u1, v1), (u0, v1)], fill)

    def patterned(
        self, polys, base: RGB, second: RGB, pattern: str, top_v: float, squeeze: float
    ) -> None:
        """Fills `polys` with a garment pattern laid out in body units: it moves with the body."""
        if pattern in ("plain", "logo"):
            for p in polys:
                self.poly(p, base)
            return
        pixels = [[self.xy(u, v) for u, v in p] for p in polys]
        mask = Image.new("L", self.canvas.size, 0)
        md = ImageDraw.Draw(mask)
        for p in pixels:
            md.polygon(p, fill=255)
        # The pattern is computed over the garment's bounding box only: the full frame costs
        # most of the rendering time.
        xs = [x for p in pixels for x, _ in p]
        ys = [y for p in pixels for _, y in p]
        w, h = self.canvas.size
        x0, x1 = max(0, math.floor(min(xs)) - 2), min(w, math.ceil(max(xs)) + 3)
        y0, y1 = max(0, math.floor(min(ys)) - 2), min(h, math.ceil(max(ys)) + 3)
        if x0 >= x1 or y0 >= y1:
            return
        # The grid of this box alone: the canvas may be a whole video frame (synthetic_video.py).
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        pv = self.body_v((yy - self.y0) / self.hp) - top_v
        pu = (xx - self.cx) / (self.hp * squeeze)
        # Periods near 0.09 body heights stay at least two pixels a stripe at 64x32.
        if pattern == "hstripes":
            on = np.mod(pv / 0.09, 1.0) < 0.5
        elif pattern == "vstripes":
            on = np.mod(pu / 0.085 + 0.25, 1.0) < 0.5
        elif pattern == "checks":
            on = (np.mod(pv / 0.1, 1.0) < 0.5) ^ (np.mod(pu / 0.1 + 0.25, 1.0) < 0.5)
        else:  # yoke: a shoulder band in the second colour
            on = pv < 0.1
        fill = np.where(on[..., None], np.array(second, np.uint8), np.array(base, np.uint8))
        self.canvas.paste(
            Image.fromarray(fill.astype(np.uint8)), (x0, y0), mask.crop((x0, y0, x1, y1))
        )
        for p in pixels:
            self.draw.polygon(p, outline=_shade(base, 0.7), width=2)


def _segment(u0: float, v0: float, u1: float, v1: float, w0: float, w1: float):
    """A limb as a quadrilateral from (u0, v0) to (u1, v1), widths w0 -> w1."""
    du, dv = u1 - u0, v1 - v0
    n = math.hypot(du, dv) or 1.0
    pu, pv = -dv / n, du / n
    return [
        (u0 + pu * w0 / 2, v0 + pv * w0 / 2),
        (u1 + pu * w1 / 2, v1 + pv * w1 / 2),
        (u1 - pu * w1 / 2, v1 - pv * w1 / 2),
        (u0 - pu * w0 / 2, v0 - pv * w0 / 2),
    ]


def _lerp(a: tuple[float, float], b: tuple[float, float], t: float) -> tuple[float, float]:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t)


def _draw_person(p: _Painter, ident: Identity, view: int, rng: np.random.Generator) -> None:
    """Draws one person, back to front, in the given view."""
    side = view == SIDE
    r = ident.head_ratio / 2
    rx = 0.8 * r
    vh = r + 0.005
    ys = 2 * r + 0.03
    yh = 1.0 - ident.leg_ratio
    yf = 0.965
    squeeze = 0.6 if side else 1.0
    sw = 0.13 * ident.build * squeeze
    ww = 0.1 * ident.build * squeeze
    hem = yh + 0.15 if ident.top_kind == "coat" else yh
    stride = float(rng.uniform(0.02, 0.07)) if side else float(rng.uniform(-0.015, 0.015))
    swing = float(rng.uniform(-0.05, 0.05))
    t_arm = 0.05 * ident.build
    bag_u = ident.bag_side * (1 if view == BACK else -1 if view == FRONT else 0)

    # Long hair falls behind the shoulders, seen beside the neck from the front.
    if ident.hair_style == "long" and view == FRONT:
        p.rect(-rx * 1.1, vh, rx * 1.1, ys + 0.09, ident.hair)
    if side and ident.bag == "backpack":
        p.rect(-sw - 0.085, ys + 0.02, -sw + 0.01, yh - 0.04, ident.bag_colour)

    # Legs: skin first, then the garment over the part it covers.
    knee = yh + (yf - yh) * 0.45
    if side:
        legs = [(0.0, stride, 0.8), (0.0, -stride, 1.0)]
        leg_w = (0.085 * ident.build, 0.045)
    else:
        legs = [(-ww / 2, -ww * 0.35 + stride, 1.0), (ww / 2, ww * 0.35 + stride, 1.0)]
        leg_w = (ww * 0.95, 0.045)
    for top_u, foot_u, shade in legs:
        quad = _segment(top_u, yh, foot_u, yf, *leg_w)
        p.poly(quad, _shade(ident.skin, shade))
        if ident.bottom_kind == "trousers":
            garment = quad
        elif ident.bottom_kind == "shorts":
            t = (knee - yh) / (yf - yh)
            garment = [quad[0], _lerp(quad[0], quad[1], t), _lerp(quad[3], quad[2], t), quad[3]]
        else:
            garment = None
        if garment is not None:
            p.poly(garment, _shade(ident.bottom, shade))
            if ident.bottom_stripe:
                # A stripe down the outer seam (the middle of the leg from the side).
                a, b = garment[0], garment[1]
                c, d = _lerp(garment[0], garment[3], 0.3), _lerp(garment[1], garment[2], 0.3)
                if top_u < 0 and not side:
                    a, b = garment[3], garment[2]
                    c, d = _lerp(garment[3], garment[0], 0.3), _lerp(garment[2], garment[1], 0.3)
                if side:
                    a, b = _lerp(garment[0], garment[3], 0.35), _lerp(garment[1], garment[2], 0.35)
                    c, d = _lerp(garment[0], garment[3], 0.65), _lerp(garment[1], garment[2], 0.65)
                p.poly([a, b, d, c], ident.bottom_second, outline=False)
        p.ellipse(foot_u + (0.02 if side else 0.0), yf, 0.04 if side else 0.032, 0.016, ident.shoes)
    if ident.bottom_kind == "skirt":
        skirt = [
            (-ww - 0.01, yh - 0.01),
            (ww + 0.01, yh - 0.01),
            (ww + 0.06, yh + 0.21),
            (-ww - 0.06, yh + 0.21),
        ]
        p.poly(skirt, ident.bottom)
        if ident.bottom_stripe:
            p.rect(-ww - 0.055, yh + 0.17, ww + 0.055, yh + 0.21, ident.bottom_second)

    # The far arm, from the side, is behind the torso.
    arm_top_v = ys + t_arm / 2
    if side:
        arms = [(0.0, -swing, 0.8, True), (0.0, swing, 1.0, False)]
    else:
        arms = [
            (-sw + t_arm / 2, -sw - 0.015 - abs(swing) / 3, 1.0, False),
            (sw - t_arm / 2, sw + 0.015 + abs(swing) / 3, 1.0, False),
        ]
    sleeve_end = 0.45 if ident.top_kind == "tshirt" else 1.0

    def draw_arm(top_u: float, hand_u: float, shade: float) -> None:
        quad = _segment(top_u, arm_top_v, hand_u, yh + 0.02, t_arm, t_arm * 0.8)
        p.poly(quad, _shade(ident.skin, shade))
        sleeve = [
            quad[0],
            _lerp(quad[0], quad[1], sleeve_end),
            _lerp(quad[3], quad[2], sleeve_end),
            quad[3],
        ]
        p.patterned(
            [sleeve],
            _shade(ident.top, shade),
            _shade(ident.top_second, shade),
            ident.top_pattern,
            ys,
            squeeze,
        )
        p.ellipse(hand_u, yh + 0.03, t_arm * 0.5, t_arm * 0.55, _shade(ident.skin, shade))

    for top_u, hand_u, shade, behind in arms:
        if behind:
            draw_arm(top_u, hand_u, shade)

    # Neck, then the torso over it.
    p.rect(-0.025, vh + 0.6 * r, 0.025, ys + 0.02, ident.skin)
    flare = 0.03 if ident.top_kind == "coat" else 0.0
    torso = [
        (-sw + 0.02, ys - 0.005),
        (sw - 0.02, ys - 0.005),
        (sw, ys + 0.03),
        (ww + flare, hem),
        (-ww - flare, hem),
        (-sw, ys + 0.03),
    ]
    p.patterned([torso], ident.top, ident.top_second, ident.top_pattern, ys, squeeze)
    if ident.top_pattern == "logo" and view == FRONT:
        cu, cv, s = 0.0, ys + 0.11, 0.05 * ident.build
        if ident.logo_shape == "circle":
            p.ellipse(cu, cv, s, s, ident.top_second)
        elif ident.logo_shape == "square":
            p.rect(cu - s, cv - s, cu + s, cv + s, ident.top_second)
        else:
            p.poly([(cu, cv - s), (cu + s, cv + s), (cu - s, cv + s)], ident.top_second)

    # Bags: a backpack is a block from behind and two straps from the front.
    if ident.bag == "backpack" and view == BACK:
        p.rect(-0.75 * sw, ys + 0.03, 0.75 * sw, yh - 0.03, ident.bag_colour)
        p.rect(-0.5 * sw, (ys + yh) / 2 + 0.02, 0.5 * sw, yh - 0.05, _shade(ident.bag_colour, 0.75))
    elif ident.bag == "backpack" and view == FRONT:
        for s in (-1, 1):
            p.rect(s * 0.55 * sw - 0.014, ys, s * 0.55 * sw + 0.014, yh - 0.1, ident.bag_colour)
    elif ident.bag == "backpack":
        p.rect(-sw + 0.01, ys, -sw + 0.035, yh - 0.08, ident.bag_colour)
    elif ident.bag == "shoulder":
        hip_u = bag_u * (ww + 0.035) if not side else 0.02
        p.poly(_segment(-bag_u * 0.6 * sw, ys, hip_u, yh - 0.03, 0.025, 0.025), ident.bag_colour)
        p.rect(hip_u - 0.055, yh - 0.05, hip_u + 0.055, yh + 0.07, ident.bag_colour)

    for top_u, hand_u, shade, behind in arms:
        if not behind:
            draw_arm(top_u, hand_u, shade)
    if ident.bag == "hand":
        hand = arms[-1][1] if side else (arms[0][1] if bag_u < 0 else arms[1][1])
        p.rect(hand - 0.045, yh + 0.045, hand + 0.045, yh + 0.14, ident.bag_colour)

    # Head: hair, the face over it, then hat or long hair from behind.
    if ident.hair_style == "long" and view == BACK:
        p.rect(-rx * 1.1, vh, rx * 1.1, ys + 0.09, ident.hair)
    p.ellipse(0.0, vh, rx * 1.08, r * 1.05, ident.hair)
    if view == FRONT:
        p.ellipse(0.0, vh + 0.15 * r, rx * 0.85, r * 0.85, ident.skin)
    elif side:
        p.ellipse(0.3 * rx, vh + 0.15 * r, rx * 0.65, r * 0.82, ident.skin)
    if ident.hair_style == "hat":
        p.draw.chord(
            p.box(-rx * 1.15, vh - r * 1.15, rx * 1.15, vh + r * 0.5), 180, 360, fill=ident.hat
        )
        brim = (-rx * 1.2, rx * 1.7) if side else (-rx * 1.3, rx * 1.3)
        p.rect(brim[0], vh - 0.2 * r, brim[1], vh - 0.05 * r, ident.hat)
    if ident.scarf is not None:
        p.rect(-rx * 1.05, ys - 0.025, rx * 1.05, ys + 0.02, ident.scarf)


def _occlude(d: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    """Something between the camera and the person: a car or bench, a pole, a passer-by."""
    kind = int(rng.integers(0, 3))
    colour = _jitter(rng, _pick(rng, [*BACKGROUND, *CLOTH.values()]), 10)
    if kind == 0:
        top = int(_CH * rng.uniform(0.62, 0.8))
        d.rectangle([0, top, _CW, _CH], fill=colour)
        d.rectangle([0, top, _CW, top + 6], fill=_shade(colour, 0.6))
    elif kind == 1:
        x = int(rng.integers(0, _CW - 20))
        d.rectangle([x, 0, x + int(rng.integers(10, 22)), _CH], fill=colour)
    else:
        # Someone walking past at the frame edge: part of a torso, legs and a head.
        outward = -1 if rng.random() < 0.5 else 1
        cx = _CW / 2 + outward * _CW * rng.uniform(0.55, 0.75)
        half = _CW * rng.uniform(0.22, 0.3)
        legs = _jitter(rng, CLOTH[_weighted(rng, BOTTOM_COLOURS)])
        d.rectangle([cx - half, _CH * 0.2, cx + half, _CH * 0.57], fill=colour)
        d.rectangle([cx - 0.8 * half, _CH * 0.57, cx + 0.8 * half, _CH], fill=legs)
        d.ellipse([cx - 0.4 * half, _CH * 0.06, cx + 0.4 * half, _CH * 0.19], fill=_pick(rng, HAIR))


def _finish(canvas: Image.Image, cam: Camera, rng: np.random.Generator) -> Image.Image:
    """Optics and sensor: downscale, blur, colour cast, uneven light, noise.

    The canvas is drawn at _SS times the output size: a 256x128 crop canvas gives a 128x64
    image, a whole video frame (synthetic_video.py) its frame size.
    """
    width, height = canvas.width // _SS, canvas.height // _SS
    img = canvas.resize((width, height), Image.Resampling.BOX)
    if cam.resolution < 1.0:
        # A low-resolution sensor: the detail below its pixel pitch is gone.
        low = (max(1, round(width * cam.resolution)), max(1, round(height * cam.resolution)))
        img = img.resize(low, Image.Resampling.BOX).resize((width, height), Image.Resampling.BILINEAR)
    blur = cam.blur + abs(rng.normal(0.0, 0.25))
    if blur > 0.15:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    a = np.asarray(img, np.float32) / 255.0
    gains = np.asarray(cam.gains, np.float32) * np.exp(rng.normal(0.0, 0.03, 3)).astype(np.float32)
    bright = cam.brightness * math.exp(rng.normal(0.0, 0.1))
    # Light falls off across the frame in a random direction.
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * (np.arange(width) / width - 0.5))[None, :] + (
        np.sin(angle) * (np.arange(height) / height - 0.5)
    )[:, None]
    light = (1.0 + rng.uniform(0.0, 0.3) * ramp).astype(np.float32)
    if cam.light_pool > 0.0:
        # A lamp's pool of light: bright under it, falling to darkness around.
        px, py = cam.pool_centre
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        d2 = ((xx / width - px) * width / height) ** 2 + (yy / height - py) ** 2
        pool = np.exp(-d2 / (2 * 0.35**2)).astype(np.float32)
        light = light * ((1.0 - cam.light_pool) + 2.0 * cam.light_pool * pool)
    a = a * gains * (bright * light)[..., None]
    a = np.clip(a, 0.0, 1.0) ** cam.gamma
    grey = a.mean(axis=2, keepdims=True)
    a = grey + cam.saturation * (a - grey)
    a = a * 255.0 + rng.normal(0.0, cam.noise, a.shape).astype(np.float32)
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


def _background(seed: int, cam: Camera, rng: np.random.Generator, domain: Domain = STREET) -> Image.Image:
    pano = _cached_panorama(seed, cam.index, domain)
    x = int(rng.integers(0, _PANORAMA_W - _CW))
    # A copy: drawing on the crop must never touch the cached scene.
    return Image.fromarray(np.ascontiguousarray(pano[:, x : x + _CW]).copy())


def render(seed: int, shot: Shot, domain: Domain = STREET) -> Image.Image:
    """The 128x64 RGB image of one shot; a distractor (pid 0) is a bad detection."""
    cam = make_camera(seed, shot.cam, domain)
    if shot.pid == 0:
        rng = _rng(seed, _TAG_DISTRACTOR, shot.index)
    else:
        rng = _rng(seed, _TAG_IMAGE, shot.pid, shot.index)
    canvas = _background(seed, cam, rng, domain)
    view = int(rng.choice(3, p=cam.view_probs))
    m = 1 if view == BACK else -1
    if view == SIDE:
        m = 1 if rng.random() < 0.5 else -1
    if shot.pid == 0:
        kind = int(rng.integers(0, 3))
        if kind > 0:
            # Half a person, or a person too close: what a poor detector returns.
            ident = make_identity(seed, 100_000 + shot.index, domain)
            hp = _CH * (rng.uniform(1.3, 2.0) if kind == 1 else rng.uniform(0.7, 0.9))
            cx = _CW * (0.5 if kind == 1 else rng.choice([0.0, 1.0]))
            y0 = -hp * rng.uniform(0.0, 0.4) if kind == 1 else (_CH - hp) / 2
            _draw_person(_Painter(canvas, cx, y0, hp, m, cam.foreshorten), ident, view, rng)
    else:
        ident = make_identity(seed, shot.pid, domain)
        low = min(0.72, domain.scale[0] - 0.02)
        hp = _CH * float(np.clip(cam.scale * math.exp(rng.normal(0.0, 0.05)), low, 0.97))
        y0 = (_CH - hp) * rng.uniform(0.25, 0.75)
        cx = _CW / 2 + rng.normal(0.0, _CW * 0.05)
        _draw_person(_Painter(canvas, cx, y0, hp, m, cam.foreshorten), ident, view, rng)
        if rng.random() < cam.occlusion:
            _occlude(ImageDraw.Draw(canvas), rng)
    return _finish(canvas, cam, rng)


def market_name(pid: int, cam: int, seq: int, frame: int, bb: int = 1) -> str:
    """Market-1501 file name: `PPPP_cCsS_FFFFFF_BB.jpg`."""
    return f"{pid:04d}_c{cam}s{seq}_{frame:06d}_{bb:02d}.jpg"


def _names(rng: np.random.Generator, pid: int, cams: list[int]) -> list[str]:
    """Unique names for a track: frames rise within each (pid, camera) sequence."""
    out, state = [], {}
    for c in cams:
        if c not in state:
            state[c] = [int(rng.integers(1, 7)), int(rng.integers(0, 900_000))]
        seq, frame = state[c]
        state[c][1] = frame + int(rng.integers(5, 60))
        out.append(market_name(pid, c, seq, frame))
    return out


def plan(ids: int, cams: int, images_per_id: int, seed: int) -> list[Shot]:
    """Which images to draw and where they go; checks the arguments."""
    _check(ids, cams, images_per_id, seed)
    rng = _rng(seed, _TAG_PLAN, ids, cams, images_per_id)
    pids = rng.permutation(np.arange(1, ids + 1))
    train = set(int(p) for p in pids[: ids // 2])
    shots: list[Shot] = []
    for pid in range(1, ids + 1):
        n_cams = int(rng.integers(2, min(cams, images_per_id) + 1))
        seen = sorted(int(c) for c in rng.choice(np.arange(1, cams + 1), n_cams, replace=False))
        track = seen + [int(c) for c in rng.choice(seen, images_per_id - n_cams)]
        track = [track[i] for i in rng.permutation(images_per_id)]
        names = _names(rng, pid, track)
        if pid in train:
            shots += [Shot(pid, c, i, SPLITS[0], n) for i, (c, n) in enumerate(zip(track, names))]
            continue
        queries: list[int] = []
        for c in [int(x) for x in rng.permutation(seen)]:
            if len(queries) == MAX_QUERIES_PER_ID:
                break
            i = track.index(c)
            rest = [j for j in range(images_per_id) if j not in queries and j != i]
            # A query must keep a match in another camera, as must the queries chosen before.
            if all(any(track[j] != track[q] for j in rest) for q in [*queries, i]):
                queries.append(i)
        for i, (c, n) in enumerate(zip(track, names)):
            shots.append(Shot(pid, c, i, SPLITS[1] if i in queries else SPLITS[2], n))
    n_distractors = max(1, ids // 8)
    d_cams = [int(c) for c in rng.integers(1, cams + 1, n_distractors)]
    frames = np.sort(rng.choice(999_999, n_distractors, replace=False))
    for j, (c, f) in enumerate(zip(d_cams, frames)):
        name = market_name(0, c, int(rng.integers(1, 7)), int(f), int(rng.integers(1, 4)))
        shots.append(Shot(0, c, j, SPLITS[2], name))
    return shots


def _check(ids: int, cams: int, images_per_id: int, seed: int) -> None:
    if not 4 <= ids <= 9999:
        raise StrongReIDError(
            f"synthetic data: --ids {ids} is out of range; use 4..9999 (half train, half test, "
            "four-digit Market ids)"
        )
    if not 2 <= cams <= 9:
        raise StrongReIDError(
            f"synthetic data: --cams {cams} is out of range; use 2..9 (Market names hold one "
            "camera digit, and queries need a second camera)"
        )
    if not 2 <= images_per_id <= 500:
        raise StrongReIDError(
            f"synthetic data: --images-per-id {images_per_id} is out of range; use 2..500"
        )
    if seed < 0:
        raise StrongReIDError(f"synthetic data: --seed {seed} must be >= 0")


def _render_chunk(seed: int, root: str, shots: list[Shot], domain: Domain = STREET) -> int:
    for shot in shots:
        img = render(seed, shot, domain)
        img.save(
            os.path.join(root, shot.split, shot.name),
            "JPEG",
            quality=make_camera(seed, shot.cam, domain).quality,
        )
    return len(shots)


def _workers(requested: int | None, n_images: int) -> int:
    if requested is not None:
        return max(1, requested)
    if n_images < _PARALLEL_MIN_IMAGES:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def _prepare(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise StrongReIDError(
            f"synthetic data: {out} exists and is not a folder; pick another --out"
        )
    for split in SPLITS:
        folder = out / split
        if folder.is_dir() and any(folder.iterdir()):
            raise StrongReIDError(
                f"synthetic data: {folder} is not empty; delete it or choose another --out "
                "(old files would mix with the new ones)"
            )
    try:
        for split in SPLITS:
            (out / split).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StrongReIDError(f"synthetic data: cannot create {out}: {exc.strerror}") from None


def generate(
    out: str | os.PathLike,
    ids: int = DEFAULT_IDS,
    cams: int = DEFAULT_CAMS,
    images_per_id: int = DEFAULT_IMAGES_PER_ID,
    seed: int = DEFAULT_SEED,
    workers: int | None = None,
    domain: str | Domain = "street",
) -> dict:
    """Writes the data set under `out` and returns its counts (ids and images per split)."""
    look = domain if isinstance(domain, Domain) else get_domain(domain)
    shots = plan(ids, cams, images_per_id, seed)
    root = Path(out)
    _prepare(root)
    n_workers = _workers(workers, len(shots))
    try:
        if n_workers == 1:
            _render_chunk(seed, str(root), shots, look)
        else:
            chunks = [shots[i : i + _CHUNK] for i in range(0, len(shots), _CHUNK)]
            # fork where it exists: the children need numpy and PIL only, nothing to re-import.
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
                list(
                    pool.map(_render_chunk, [seed] * len(chunks), [str(root)] * len(chunks),
                             chunks, [look] * len(chunks))
                )
    except OSError as exc:
        raise StrongReIDError(f"synthetic data: cannot write under {root}: {exc}") from None
    counts = _counts(shots)
    counts.update(cams=cams, images_per_id=images_per_id, seed=seed)
    if look.stream is not None:  # the street's synthetic.json stays as it always was
        counts["domain"] = look.name
    meta = {"generator": "strongreid.data.synthetic", "format": 1, **counts}
    (root / "synthetic.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return counts


def _counts(shots: list[Shot]) -> dict:
    def ids_of(split: str) -> int:
        return len({s.pid for s in shots if s.split == split and s.pid != 0})

    def images_of(split: str) -> int:
        return sum(1 for s in shots if s.split == split)

    return {
        "ids": len({s.pid for s in shots if s.pid != 0}),
        "train_ids": ids_of(SPLITS[0]),
        "test_ids": len({s.pid for s in shots if s.split != SPLITS[0] and s.pid != 0}),
        "train_images": images_of(SPLITS[0]),
        "query_images": images_of(SPLITS[1]),
        "gallery_images": images_of(SPLITS[2]),
        "distractors": sum(1 for s in shots if s.pid == 0),
        "images": len(shots),
    }


def synth_command(
    out: str, ids: int | None, cams: int | None, images_per_id: int | None, seed: int | None,
    domain: str = "street",
) -> int:
    """`strongreid synth`: None means the default."""
    start = time.perf_counter()
    counts = generate(
        out,
        ids=DEFAULT_IDS if ids is None else ids,
        cams=DEFAULT_CAMS if cams is None else cams,
        images_per_id=DEFAULT_IMAGES_PER_ID if images_per_id is None else images_per_id,
        seed=DEFAULT_SEED if seed is None else seed,
        domain=domain,
    )
    print(
        f"wrote {counts['images']} images to {out} in {time.perf_counter() - start:.1f}s: "
        f"train {counts['train_ids']} ids / {counts['train_images']} images, "
        f"query {counts['query_images']}, gallery {counts['gallery_images']} "
        f"(incl. {counts['distractors']} distractors), {counts['cams']} cameras"
        + (f", domain {counts['domain']}" if "domain" in counts else "")
    )
    return 0
