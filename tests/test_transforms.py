"""Train/test transforms and random erasing: bounds, fills, exact values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from strongreid.config import get_cfg_defaults
from strongreid.data.transforms import RandomErasing, build_transforms
from strongreid.errors import ConfigError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SENTINEL = 7.0  # a value no fill mode writes, so the erased patch is where it changed


def erased_box(before: torch.Tensor, after: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Bounding box (top, left, h, w) of the changed pixels; asserts it is a full rectangle."""
    changed = (before != after).any(dim=0)
    if not changed.any():
        return None
    rows = torch.nonzero(changed.any(dim=1)).flatten()
    cols = torch.nonzero(changed.any(dim=0)).flatten()
    top, left = int(rows[0]), int(cols[0])
    h, w = int(rows[-1]) - top + 1, int(cols[-1]) - left + 1
    assert changed[top : top + h, left : left + w].all()
    assert int(changed.sum()) == h * w
    return top, left, h, w


@settings(max_examples=150, deadline=None)
@given(
    height=st.integers(32, 256),
    width=st.integers(32, 256),
    sl=st.floats(0.01, 0.3),
    span=st.floats(0.0, 0.4),
    r1=st.floats(0.2, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_erasing_patch_bounds(
    height: int, width: int, sl: float, span: float, r1: float, seed: int
) -> None:
    sh = min(1.0, sl + span)
    eraser = RandomErasing(probability=1.0, sl=sl, sh=sh, r1=r1)
    torch.manual_seed(seed)
    params = eraser.get_params(height, width)
    if params is None:
        return
    top, left, h, w = params
    # Inside the image, strictly smaller than it, top-left in the inclusive range.
    assert 0 <= top <= height - h and 0 <= left <= width - w
    assert h < height and w < width
    # h and w are round(sqrt(a*r)) and round(sqrt(a/r)) for some a in [sl, sh]*H*W and r in
    # [r1, 1/r1]; undo the rounding with half a pixel either way.
    area = height * width
    assert (h - 0.5) * (w - 0.5) <= sh * area + 1e-9
    assert (h + 0.5) * (w + 0.5) >= sl * area - 1e-9
    assert (h - 0.5) / (w + 0.5) <= 1.0 / r1 + 1e-9
    if w > 0:
        assert (h + 0.5) / (w - 0.5) >= r1 - 1e-9


def test_erasing_exact_square_patch() -> None:
    # sl = sh = 0.25 and r1 = 1 pin area and aspect: h = w = round(sqrt(0.25 * 20 * 20)) = 10.
    eraser = RandomErasing(probability=1.0, sl=0.25, sh=0.25, r1=1.0)
    for seed in range(30):
        torch.manual_seed(seed)
        top, left, h, w = eraser.get_params(20, 20)
        assert (h, w) == (10, 10)
        assert 0 <= top <= 10 and 0 <= left <= 10


def test_erasing_corners_are_reachable() -> None:
    # Top-left is uniform over the inclusive range [0, H-h] x [0, W-w]: with H-h = W-w = 1,
    # all four positions appear.
    eraser = RandomErasing(probability=1.0, sl=0.5, sh=0.5, r1=1.0)
    seen = set()
    torch.manual_seed(0)
    for _ in range(200):
        top, left, h, w = eraser.get_params(4, 4)  # h = w = round(sqrt(8)) = 3
        assert (h, w) == (3, 3)
        seen.add((top, left))
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_erasing_rejects_patch_as_wide_as_image() -> None:
    # Target 0.25 * 40 * 10 = 100, aspect 1 -> h = w = 10 = W, so every attempt fails.
    eraser = RandomErasing(probability=1.0, sl=0.25, sh=0.25, r1=1.0)
    assert eraser.get_params(40, 10) is None
    img = torch.full((3, 40, 10), SENTINEL)
    assert torch.equal(eraser(img), img)


@pytest.mark.parametrize("fill", ["original", "zero"])
def test_erasing_fill_exact(fill: str) -> None:
    eraser = RandomErasing(probability=1.0, sl=0.25, sh=0.25, r1=1.0, fill=fill, mean=MEAN)
    torch.manual_seed(1)
    img = torch.full((3, 20, 20), SENTINEL)
    out = eraser(img)
    assert torch.equal(img, torch.full((3, 20, 20), SENTINEL))  # the input is left alone
    top, left, h, w = erased_box(img, out)
    assert (h, w) == (10, 10)
    expected = MEAN if fill == "original" else (0.0, 0.0, 0.0)
    for c in range(3):
        patch = out[c, top : top + h, left : left + w]
        assert torch.equal(patch, torch.full((h, w), expected[c]))
    outside = out.clone()
    outside[:, top : top + h, left : left + w] = SENTINEL
    assert torch.equal(outside, img)


def test_erasing_fill_random_is_standard_normal() -> None:
    eraser = RandomErasing(probability=1.0, sl=0.25, sh=0.25, r1=1.0, fill="random")
    torch.manual_seed(2)
    img = torch.full((3, 40, 40), SENTINEL)
    out = eraser(img)
    top, left, h, w = erased_box(img, out)
    patch = out[:, top : top + h, left : left + w]
    assert patch.shape == (3, 20, 20)
    # 1200 N(0, 1) draws: the mean is within 7 standard errors of 0, the std near 1.
    assert abs(float(patch.mean())) < 7 / math.sqrt(1200)
    assert 0.85 < float(patch.std()) < 1.15
    torch.manual_seed(2)
    assert torch.equal(eraser(img), out)  # reproducible from torch's RNG


def test_erasing_single_channel_uses_first_mean() -> None:
    eraser = RandomErasing(probability=1.0, sl=0.25, sh=0.25, r1=1.0, mean=MEAN)
    torch.manual_seed(3)
    img = torch.full((1, 20, 20), SENTINEL)
    out = eraser(img)
    top, left, h, w = erased_box(img, out)
    assert torch.equal(out[0, top : top + h, left : left + w], torch.full((h, w), MEAN[0]))


def test_erasing_probability() -> None:
    img = torch.full((3, 20, 20), SENTINEL)
    never = RandomErasing(probability=0.0, sl=0.25, sh=0.25, r1=1.0)
    always = RandomErasing(probability=1.0, sl=0.25, sh=0.25, r1=1.0)
    half = RandomErasing(probability=0.5, sl=0.25, sh=0.25, r1=1.0)
    torch.manual_seed(4)
    assert all(torch.equal(never(img), img) for _ in range(50))
    assert all(not torch.equal(always(img), img) for _ in range(50))
    erased = sum(not torch.equal(half(img), img) for _ in range(400))
    assert 140 < erased < 260  # 400 draws at p = 0.5: 6 standard deviations either way


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"probability": 1.5}, "RE_PROB"),
        ({"sl": 0.5, "sh": 0.2}, "RE_SL"),
        ({"r1": 0.0}, "RE_R1"),
        ({"fill": "mean"}, "RE_FILL"),
    ],
)
def test_erasing_bad_values(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        RandomErasing(**kwargs)


def small_cfg(**input_overrides: object):
    cfg = get_cfg_defaults()
    cfg.INPUT.SIZE_TRAIN = [32, 16]
    cfg.INPUT.SIZE_TEST = [24, 12]
    for key, value in input_overrides.items():
        setattr(cfg.INPUT, key, value)
    return cfg


def constant_image(rgb: tuple[int, int, int], size: tuple[int, int] = (30, 50)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def normalised(rgb: tuple[int, int, int]) -> list[float]:
    return [(v / 255.0 - m) / s for v, m, s in zip(rgb, MEAN, STD, strict=True)]


def test_output_shapes() -> None:
    cfg = small_cfg()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 33, 3), dtype=np.uint8))
    torch.manual_seed(0)
    train = build_transforms(cfg, is_train=True)(img)
    test = build_transforms(cfg, is_train=False)(img)
    assert train.shape == (3, 32, 16) and train.dtype == torch.float32
    assert test.shape == (3, 24, 12) and test.dtype == torch.float32


def test_test_transform_normalises_constant_image_exactly() -> None:
    rgb = (51, 102, 204)
    out = build_transforms(small_cfg(), is_train=False)(constant_image(rgb))
    for c, value in enumerate(normalised(rgb)):
        assert torch.allclose(out[c], torch.full((24, 12), value), atol=1e-6)


def test_train_transform_without_randomness_matches_test_values() -> None:
    rgb = (10, 200, 90)
    cfg = small_cfg(PROB=0.0, RE_PROB=0.0, PADDING=0)
    out = build_transforms(cfg, is_train=True)(constant_image(rgb))
    for c, value in enumerate(normalised(rgb)):
        assert torch.allclose(out[c], torch.full((32, 16), value), atol=1e-6)


def test_padding_is_black_border() -> None:
    rgb = (255, 255, 255)
    cfg = small_cfg(PROB=0.0, RE_PROB=0.0, PADDING=4)
    transform = build_transforms(cfg, is_train=True)
    inside, border = normalised(rgb), normalised((0, 0, 0))
    saw_border = False
    torch.manual_seed(5)
    for _ in range(20):
        out = transform(constant_image(rgb))
        is_inside = torch.isclose(out[0], torch.tensor(inside[0]), atol=1e-6)
        is_border = torch.isclose(out[0], torch.tensor(border[0]), atol=1e-6)
        assert (is_inside | is_border).all()
        saw_border |= bool(is_border.any())
        # The image region the crop keeps is one rectangle of at least (32-4) x (16-4).
        rows = torch.nonzero(is_inside.any(dim=1)).flatten()
        cols = torch.nonzero(is_inside.any(dim=0)).flatten()
        assert len(rows) >= 28 and len(cols) >= 12
        assert int(is_inside.sum()) == len(rows) * len(cols)
    assert saw_border


def test_flip_probability_one_mirrors() -> None:
    cfg = small_cfg(PROB=1.0, RE_PROB=0.0, PADDING=0)
    cfg.INPUT.SIZE_TRAIN = [4, 2]
    img = Image.new("RGB", (2, 4), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 1, 4))  # left column white
    out = build_transforms(cfg, is_train=True)(img)
    white, black = normalised((255, 255, 255))[0], normalised((0, 0, 0))[0]
    assert torch.allclose(out[0, :, 1], torch.full((4,), white), atol=1e-6)
    assert torch.allclose(out[0, :, 0], torch.full((4,), black), atol=1e-6)


def test_train_transform_erases_with_config_fill() -> None:
    cfg = small_cfg(PROB=0.0, RE_PROB=1.0, PADDING=0, RE_SL=0.25, RE_SH=0.25, RE_R1=1.0)
    cfg.INPUT.SIZE_TRAIN = [20, 20]
    rgb = (0, 0, 0)
    torch.manual_seed(6)
    out = build_transforms(cfg, is_train=True)(constant_image(rgb, (20, 20)))
    filled = torch.stack([torch.isclose(out[c], torch.tensor(MEAN[c])) for c in range(3)]).all(0)
    assert int(filled.sum()) == 100  # a 10 x 10 patch of PIXEL_MEAN in normalised space


def test_bad_config_values() -> None:
    with pytest.raises(ConfigError, match="INPUT.SIZE_TRAIN"):
        build_transforms(small_cfg(SIZE_TRAIN=[0, 16]), is_train=True)
    with pytest.raises(ConfigError, match="INPUT.PIXEL_STD"):
        build_transforms(small_cfg(PIXEL_STD=[0.2, 0.0, 0.2]), is_train=False)
    with pytest.raises(ConfigError, match="INPUT.RE_FILL"):
        build_transforms(small_cfg(RE_FILL="gray"), is_train=True)
