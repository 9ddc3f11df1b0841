"""Where the synthetic pedestrians are filmed: a domain is a look shared by all its cameras.

A model trained on one domain and tested on another meets what a benchmark model meets on a
user's own cameras: other scenes, another light level and colour of light, cameras mounted
higher or lower, other resolution and blur, other people wearing other clothes. Nothing here
corrupts an image after the fact; every difference is one of the scene, the light or the camera.

`street` is the look `strongreid synth` has always drawn (its files are byte-identical for a
seed). `night` is a street after dark under sodium lamps, filmed by high-mounted, low-resolution
cameras, with people in winter clothing. A new domain is `DOMAINS.register(name)(Domain(...))`,
here or in the user's own code.
"""

from __future__ import annotations

from dataclasses import dataclass

from strongreid.registry import Registry

Range = tuple[float, float]


@dataclass(frozen=True)
class Domain:
    """The distributions a domain draws its people, scenes and cameras from.

    Ranges are (low, high) of a uniform draw. A field left at its default draws exactly as
    `street` does, with the same random numbers.
    """

    name: str
    # Extra key of the identity and camera random streams: other people, other cameras. None
    # keeps the streams of the original data set.
    stream: int | None = None
    scene: str = "street"  # which panorama painter draws the static scene
    top_colours: tuple[tuple[str, int], ...] = (
        ("black", 3), ("white", 2), ("grey", 2), ("navy", 2), ("red", 1), ("green", 1))
    bottom_colours: tuple[tuple[str, int], ...] = (
        ("black", 4), ("jeans", 4), ("grey", 2), ("khaki", 1), ("navy", 1))
    top_kind_p: tuple[float, float, float] | None = None  # tshirt, longsleeve, coat
    hair_style_p: tuple[float, float, float] = (0.45, 0.35, 0.2)  # short, long, hat
    bottom_kind_p: tuple[float, float, float] = (0.6, 0.22, 0.18)  # trousers, shorts, skirt
    scarf_p: float = 0.2
    # White balance: log red/blue gain ~ N(mean, sd); log green tint ~ N(0, tint_sd).
    temperature: Range = (0.0, 0.07)
    tint_sd: float = 0.04
    log_brightness: Range = (-0.25, 0.15)
    gamma: Range = (0.9, 1.1)
    saturation: Range = (0.8, 1.05)
    blur: Range = (0.0, 0.9)
    noise: Range = (2.0, 8.0)
    jpeg_quality: tuple[int, int] = (70, 96)
    scale: Range = (0.8, 0.92)  # person height / crop height
    occlusion: Range = (0.05, 0.15)
    # A camera mounted high looks down: the head and shoulders grow, the legs shorten.
    foreshorten: Range = (0.0, 0.0)
    # Sensor resolution as a fraction of the output size (1: as sharp as the output).
    resolution: Range = (1.0, 1.0)
    # Strength of the pool of lamp light around the person (0: the street's even light).
    light_pool: Range = (0.0, 0.0)
    # Each camera mostly sees one view (front, back or side): its probability, and the
    # probability of each of the two others.
    view_p: tuple[float, float] = (0.6, 0.2)


DOMAINS: Registry[Domain] = Registry("synthetic domain")

STREET = DOMAINS.register("street")(Domain(name="street"))

NIGHT = DOMAINS.register("night")(
    Domain(
        name="night",
        stream=2,
        scene="night",
        # Winter: dark coats and trousers, hats and scarves; few light or bright colours.
        top_colours=(("black", 5), ("navy", 3), ("brown", 2), ("grey", 2), ("khaki", 1),
                     ("red", 1)),
        bottom_colours=(("black", 5), ("jeans", 3), ("grey", 2), ("brown", 1)),
        top_kind_p=(0.05, 0.3, 0.65),
        hair_style_p=(0.35, 0.25, 0.4),
        bottom_kind_p=(0.85, 0.02, 0.13),
        scarf_p=0.45,
        # Sodium lamps: a strong orange cast that white balance only partly corrects.
        temperature=(0.28, 0.06),
        tint_sd=0.05,
        log_brightness=(-0.65, -0.3),
        gamma=(1.0, 1.2),
        saturation=(0.55, 0.8),
        blur=(0.5, 1.3),
        noise=(7.0, 14.0),
        jpeg_quality=(50, 78),
        scale=(0.62, 0.78),
        occlusion=(0.08, 0.2),
        foreshorten=(0.25, 0.6),
        resolution=(0.5, 0.72),
        light_pool=(0.35, 0.7),
        view_p=(0.5, 0.25),
    )
)


def get_domain(name: str) -> Domain:
    """The registered domain `name` (a clear error listing the known ones otherwise)."""
    return DOMAINS.get(name)
