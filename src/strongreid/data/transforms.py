"""Train and test transforms of the strong baseline, with its random erasing."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchvision import transforms as T
from yacs.config import CfgNode

from strongreid.config.components import check_choices, config_check, lookup
from strongreid.errors import ConfigError

RE_FILLS = ("original", "zero", "random")


def _uniform(low: float, high: float) -> float:
    # torch's RNG rather than `random`, so the loader's per-worker seeding covers it.
    return low + (high - low) * torch.rand(()).item()


class RandomErasing:
    """Random erasing (Zhong et al.) on a normalised C×H×W tensor, as in reid-strong-baseline.

    The aspect ratio is drawn uniformly from [r1, 1/r1] (not log-uniform) like the original.
    `fill`: 'original' writes `mean` (the config's PIXEL_MEAN) into the normalised tensor,
    'zero' writes 0 (the mean pixel after normalisation), 'random' writes N(0, 1) noise.
    """

    def __init__(
        self,
        probability: float = 0.5,
        sl: float = 0.02,
        sh: float = 0.4,
        r1: float = 0.3,
        fill: str = "original",
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        attempts: int = 100,
    ) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ConfigError(f"INPUT.RE_PROB must be in [0, 1], got {probability}")
        if not 0.0 < sl <= sh <= 1.0:
            raise ConfigError(
                f"random-erasing area range INPUT.RE_SL={sl}, INPUT.RE_SH={sh} must satisfy "
                "0 < RE_SL <= RE_SH <= 1"
            )
        if not 0.0 < r1 <= 1.0:
            raise ConfigError(f"INPUT.RE_R1 must be in (0, 1], got {r1}")
        if fill not in RE_FILLS:
            raise ConfigError(f"INPUT.RE_FILL must be one of {', '.join(RE_FILLS)}, got {fill!r}")
        if len(mean) == 0:
            raise ConfigError("INPUT.PIXEL_MEAN is empty; give one value per channel")
        self.probability = float(probability)
        self.sl = float(sl)
        self.sh = float(sh)
        self.r1 = float(r1)
        self.fill = fill
        self.mean = tuple(float(m) for m in mean)
        self.attempts = int(attempts)

    def get_params(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """Draw a patch `(top, left, h, w)` for an H×W image; None when every attempt fails."""
        area = height * width
        for _ in range(self.attempts):
            target = _uniform(self.sl, self.sh) * area
            aspect = _uniform(self.r1, 1.0 / self.r1)
            h = round(math.sqrt(target * aspect))
            w = round(math.sqrt(target / aspect))
            if w < width and h < height:
                top = int(torch.randint(0, height - h + 1, ()).item())
                left = int(torch.randint(0, width - w + 1, ()).item())
                return top, left, h, w
        return None

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.probability == 0.0 or torch.rand(()).item() >= self.probability:
            return img
        channels, height, width = img.shape[-3:]
        params = self.get_params(height, width)
        if params is None:
            return img
        top, left, h, w = params
        out = img.clone()
        patch = out[..., top : top + h, left : left + w]
        if self.fill == "zero":
            patch.zero_()
        elif self.fill == "random":
            patch.copy_(torch.randn(patch.shape, dtype=out.dtype))
        elif channels == 3 and len(self.mean) >= 3:
            for c in range(3):
                patch[..., c, :, :] = self.mean[c]
        else:
            # The original fills a non-RGB image with the first mean value only.
            patch.fill_(self.mean[0])
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(probability={self.probability}, sl={self.sl}, sh={self.sh}, "
            f"r1={self.r1}, fill={self.fill!r}, mean={self.mean})"
        )


def _size(cfg: Any, key: str) -> tuple[int, int]:
    value = getattr(cfg.INPUT, key)
    try:
        height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"INPUT.{key} must be [height, width], got {value!r}") from None
    if height <= 0 or width <= 0:
        raise ConfigError(f"INPUT.{key} must be positive, got {value!r}")
    return height, width


def _normalize(cfg: Any) -> T.Normalize:
    mean, std = list(cfg.INPUT.PIXEL_MEAN), list(cfg.INPUT.PIXEL_STD)
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(
            f"INPUT.PIXEL_MEAN and INPUT.PIXEL_STD need 3 values (RGB), got {mean} and {std}"
        )
    if any(s <= 0 for s in std):
        raise ConfigError(f"INPUT.PIXEL_STD values must be positive, got {std}")
    return T.Normalize(mean=mean, std=std)


def _photometric(cfg: Any) -> list:
    """Optional first steps on the PIL image: AutoAugment (fast-reid SBS: ImageNet policy with
    probability 0.1, before the resize) and colour jitter (layumi --color_jitter: 0.1/0.1/0.1/0,
    also first). Both draw from torch's RNG, so the loader's per-image seeding covers them."""
    steps: list = []
    autoaug = float(cfg.INPUT.AUTOAUG_PROB)
    if not 0.0 <= autoaug <= 1.0:
        raise ConfigError(f"INPUT.AUTOAUG_PROB must be in [0, 1], got {autoaug}")
    if autoaug > 0:
        steps.append(T.RandomApply([T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)], p=autoaug))
    if cfg.INPUT.COLOR_JITTER:
        jitter = [float(v) for v in cfg.INPUT.CJ_PARAMS]
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ConfigError(
                f"INPUT.CJ_PARAMS = {jitter}: give [brightness, contrast, saturation, hue], all >= 0 "
                "and hue <= 0.5 (layumi: [0.1, 0.1, 0.1, 0.0])"
            )
        steps.append(T.ColorJitter(*jitter))
    return steps


INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def _interpolation(cfg: Any) -> T.InterpolationMode:
    """INPUT.INTERPOLATION: 'bilinear' (the original) or 'bicubic' (fast-reid's Resize)."""
    name = str(getattr(cfg.INPUT, "INTERPOLATION", "bilinear"))
    if name not in INTERPOLATIONS:
        raise ConfigError(f"INPUT.INTERPOLATION = {name!r}: use 'bilinear' or 'bicubic'.")
    return INTERPOLATIONS[name]


def build_transforms(cfg: Any, is_train: bool) -> T.Compose:
    """The PIL -> normalised tensor pipeline of the strong baseline (train adds flip, pad+crop and erasing)."""
    if not is_train:
        size = _size(cfg, "SIZE_TEST")
        return T.Compose(
            [
                T.Resize(size, interpolation=_interpolation(cfg)),
                T.ToTensor(),
                _normalize(cfg),
            ]
        )
    size = _size(cfg, "SIZE_TRAIN")
    prob = float(cfg.INPUT.PROB)
    if not 0.0 <= prob <= 1.0:
        raise ConfigError(f"INPUT.PROB (flip probability) must be in [0, 1], got {prob}")
    padding = int(cfg.INPUT.PADDING)
    if padding < 0:
        raise ConfigError(f"INPUT.PADDING must be >= 0, got {padding}")
    return T.Compose(
        [
            *_photometric(cfg),
            T.Resize(size, interpolation=_interpolation(cfg)),
            T.RandomHorizontalFlip(p=prob),
            T.Pad(padding, fill=0),
            T.RandomCrop(size),
            T.ToTensor(),
            _normalize(cfg),
            RandomErasing(
                probability=float(cfg.INPUT.RE_PROB),
                sl=float(cfg.INPUT.RE_SL),
                sh=float(cfg.INPUT.RE_SH),
                r1=float(cfg.INPUT.RE_R1),
                fill=str(cfg.INPUT.RE_FILL),
                mean=cfg.INPUT.PIXEL_MEAN,
            ),
        ]
    )


@config_check("input")
def check_input_keys(cfg: CfgNode) -> None:
    """INPUT.*: sizes, pixel statistics, probabilities and random-erasing bounds."""
    check_choices(cfg, {"INPUT.RE_FILL": RE_FILLS, "INPUT.INTERPOLATION": ("bilinear", "bicubic")})
    for key in ("INPUT.SIZE_TRAIN", "INPUT.SIZE_TEST"):
        v = lookup(cfg, key)
        if len(v) != 2 or any(int(x) <= 0 for x in v):
            raise ConfigError(f"{key} = {list(v)}: expected [height, width] with positive values.")
    for key in ("INPUT.PIXEL_MEAN", "INPUT.PIXEL_STD"):
        if len(lookup(cfg, key)) != 3:
            raise ConfigError(f"{key} needs three values (R, G, B).")
    if any(s <= 0 for s in cfg.INPUT.PIXEL_STD):
        raise ConfigError("INPUT.PIXEL_STD values must be positive.")
    for key in ("INPUT.PROB", "INPUT.RE_PROB"):
        v = lookup(cfg, key)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{key} = {v} must lie in [0, 1].")
    if not 0 < cfg.INPUT.RE_SL <= cfg.INPUT.RE_SH < 1:
        raise ConfigError(
            f"INPUT.RE_SL = {cfg.INPUT.RE_SL} and INPUT.RE_SH = {cfg.INPUT.RE_SH}: "
            "need 0 < RE_SL <= RE_SH < 1."
        )
    if not 0 < cfg.INPUT.RE_R1 <= 1:
        raise ConfigError(f"INPUT.RE_R1 = {cfg.INPUT.RE_R1} must lie in (0, 1].")
    if cfg.INPUT.PADDING < 0:
        raise ConfigError(f"INPUT.PADDING = {cfg.INPUT.PADDING} must be >= 0.")
    if not 0.0 <= cfg.INPUT.AUTOAUG_PROB <= 1.0:
        raise ConfigError(f"INPUT.AUTOAUG_PROB = {cfg.INPUT.AUTOAUG_PROB} must lie in [0, 1].")
