"""The 'device' data path: decoded-image cache, batched augmentation, JPEG decoders.

The batched path must make the same random decisions as the seeded per-image PIL path (so it
trains on the same images, and resume and world-size equivalence keep holding): compared pixel
for pixel, which covers the flip, the crop offsets and the erased rectangles at once, plus the
decisions themselves read back from a coordinate-coded image.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_utils import tiny_train_opts
from PIL import Image

from strongreid.cli import main
from strongreid.config import load_config
from strongreid.data.build import SeededDataset, build_train_loader
from strongreid.data.cache import open_cache, resize_like_pil_path
from strongreid.data.decode import available_decoders, decode_jpeg_bytes, resolve_decoder
from strongreid.data.device_loader import DeviceBatchLoader
from strongreid.data.gpu_augment import build_batch_augment
from strongreid.data.image import ImageDataset, read_image
from strongreid.data.splits import load_splits
from strongreid.data.transforms import build_transforms
from strongreid.errors import DatasetError


def _cfg(root: Path, tmp: Path, **overrides):
    opts = {"DATALOADER.CACHE_DIR": tmp / "cache", "INPUT.PADDING": 4, "INPUT.RE_PROB": 0.5}
    opts.update(overrides)
    return load_config(None, tiny_train_opts(root, tmp / "out", **opts))


@pytest.mark.parametrize("fill", ["original", "zero", "random"])
def test_batched_path_equals_the_seeded_pil_path_pixel_for_pixel(tiny_synthetic_root, tmp_path, fill):
    cfg = _cfg(tiny_synthetic_root, tmp_path, **{"INPUT.RE_FILL": fill})
    records = load_splits(cfg).train[:48]
    seeds = [7919 * k + 13 for k in range(len(records))]
    pil = SeededDataset(ImageDataset(records, build_transforms(cfg, is_train=True)))
    expected = torch.stack([pil[(i, s)][0] for i, s in enumerate(seeds)])
    cache = open_cache([r[0] for r in records], (64, 32), tmp_path / "cache", name="t")
    augment = build_batch_augment(cfg)
    params = augment.draw_params(seeds)
    got = augment(torch.from_numpy(np.array(cache.images)), params)
    assert got.dtype == torch.float32 and got.shape == expected.shape == (48, 3, 64, 32)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # The GPU's one-gather flip + crop and the CPU's per-image slicing agree exactly.
    raw = torch.from_numpy(np.array(cache.images))
    assert torch.equal(augment._flip_crop_gather(raw, params), augment._flip_crop_loop(raw, params))
    # Not a vacuous comparison: the decisions vary over the batch.
    assert 0 < int(params.flip.sum()) < 48
    assert len(set(params.top.tolist())) > 3 and len(set(params.left.tolist())) > 3
    erased = int((params.erase[:, 2] > 0).sum())
    assert 0 < erased < 48


def test_decisions_read_back_from_a_coordinate_coded_image(tmp_path):
    # Pixel (y, x) holds (y, x, 1): the output says where each pixel came from, so the flip and the
    # crop offset of every image can be read off and compared with draw_params and torchvision's
    # own draws under the same seed.
    cfg = load_config(None, ["INPUT.SIZE_TRAIN", "[20, 12]", "INPUT.PADDING", "3", "INPUT.RE_PROB", "0",
                             "INPUT.PIXEL_MEAN", "[0, 0, 0]", "INPUT.PIXEL_STD", "[1, 1, 1]"])
    y, x = np.mgrid[0:20, 0:12]
    img = np.stack([y * 10, x * 10, np.full_like(y, 255)], -1).astype(np.uint8)
    augment = build_batch_augment(cfg)
    seeds = list(range(40))
    params = augment.draw_params(seeds)
    out = augment(torch.from_numpy(np.repeat(img[None], len(seeds), 0)), params)
    transform = build_transforms(cfg, is_train=True)
    for k, seed in enumerate(seeds):
        torch.manual_seed(seed)
        flipped = bool(torch.rand(1) < 0.5)
        top, left = (int(torch.randint(0, 7, (1,)).item()) for _ in range(2))
        assert (bool(params.flip[k]), int(params.top[k]), int(params.left[k])) == (flipped, top, left)
        real = out[k, 2] > 0.5  # the blue channel is 1 on the image, 0 on the padding
        ys, xs = torch.nonzero(real, as_tuple=True)
        src_y = (out[k, 0][real] * 255 / 10).round().long()
        src_x = (out[k, 1][real] * 255 / 10).round().long()
        assert torch.equal(src_y, ys + top - 3)
        expected_x = xs + left - 3
        assert torch.equal(src_x, 11 - expected_x if flipped else expected_x)
        torch.manual_seed(seed)
        torch.testing.assert_close(transform(Image.fromarray(img)), out[k], atol=1e-6, rtol=0)


def test_cache_is_built_once_and_rebuilt_when_a_file_changes(tiny_synthetic_root, tmp_path):
    src = sorted((tiny_synthetic_root / "synthetic" / "bounding_box_train").glob("*.jpg"))[:6]
    paths = []
    for p in src:
        shutil.copy(p, tmp_path / p.name)
        paths.append(str(tmp_path / p.name))
    first = open_cache(paths, (64, 32), tmp_path / "c", name="x")
    for i, p in enumerate(paths):
        assert np.array_equal(first.images[i], resize_like_pil_path(read_image(p), (64, 32)))
    stamp = first.path.stat().st_mtime_ns
    again = open_cache(paths, (64, 32), tmp_path / "c", name="x")
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp  # not rebuilt
    other_size = open_cache(paths, (32, 16), tmp_path / "c", name="x")
    assert other_size.path != first.path and other_size.images.shape == (6, 32, 16, 3)
    # Replace one file's content: the cache notices (size/mtime) and rebuilds with the new pixels.
    Image.new("RGB", (64, 128), (250, 10, 10)).save(paths[2], quality=95)
    rebuilt = open_cache(paths, (64, 32), tmp_path / "c", name="x")
    assert rebuilt.path.stat().st_mtime_ns != stamp
    assert abs(int(rebuilt.images[2][..., 0].mean()) - 250) <= 3
    assert np.array_equal(rebuilt.images[0], first.images[0])


def test_the_cache_resizes_with_the_configured_filter_under_its_own_name(tiny_synthetic_root, tmp_path):
    import hashlib
    import os

    paths = [str(p) for p in sorted((tiny_synthetic_root / "synthetic" / "bounding_box_train").glob("*.jpg"))[:4]]
    bilinear = open_cache(paths, (64, 32), tmp_path / "c", name="x")
    bicubic = open_cache(paths, (64, 32), tmp_path / "c", name="x", interpolation="bicubic")
    assert bicubic.path != bilinear.path
    for i, p in enumerate(paths):
        img = Image.open(p).convert("RGB")
        assert np.array_equal(bicubic.images[i], np.asarray(img.resize((32, 64), Image.Resampling.BICUBIC)))
        assert np.array_equal(bilinear.images[i], np.asarray(img.resize((32, 64), Image.Resampling.BILINEAR)))
    assert not np.array_equal(np.asarray(bicubic.images), np.asarray(bilinear.images))
    # A bilinear cache keeps the name it had before the filter was part of the key.
    h = hashlib.sha256(b"v1 64x32\n")
    for p in paths:
        h.update(os.path.abspath(p).encode() + b"\n")
    assert bilinear.path.name == f"x-64x32-{h.hexdigest()[:20]}.u8"
    with pytest.raises(DatasetError, match="not 'lanczos'"):
        resize_like_pil_path(Image.open(paths[0]), (64, 32), "lanczos")


def _batches(loader, epoch: int):
    loader.sampler.set_epoch(epoch)
    return [(x.clone(), p.clone(), paths) for x, p, _c, paths in loader]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_device_loader_yields_the_pil_loader_batches(tiny_synthetic_root, tmp_path, interpolation):
    # The synthetic images are 128 x 64, so INPUT.INTERPOLATION's filter shows in every pixel.
    cfg_pil = _cfg(tiny_synthetic_root, tmp_path, **{"INPUT.INTERPOLATION": interpolation})
    cfg_dev = _cfg(tiny_synthetic_root, tmp_path, **{"DATALOADER.DATA_PATH": "device",
                                                     "INPUT.INTERPOLATION": interpolation})
    records = load_splits(cfg_pil).train
    for rank in (0, 1):  # each rank of a 2-process run sees the same images on both paths
        pil = build_train_loader(cfg_pil, records, rank=rank, world_size=2)
        dev = build_train_loader(cfg_dev, records, rank=rank, world_size=2, device="cpu")
        assert isinstance(dev, DeviceBatchLoader) and len(dev) == len(pil)
        for epoch in (1, 2):
            a, b = _batches(pil, epoch), _batches(dev, epoch)
            assert len(a) == len(b) > 0
            for (xa, pa, qa), (xb, pb, qb) in zip(a, b):
                assert qa == qb and torch.equal(pa, pb)
                torch.testing.assert_close(xb, xa, atol=1e-6, rtol=0)


def test_device_loader_substitutes_skipped_images_like_the_pil_path(tiny_synthetic_root, tmp_path):
    cfg = _cfg(tiny_synthetic_root, tmp_path, **{"DATALOADER.SKIP_CORRUPT": True})
    records = load_splits(cfg).train
    bad = [0, 5, 17]
    pil = build_train_loader(cfg, records, known_corrupt=bad)
    dev_cfg = _cfg(tiny_synthetic_root, tmp_path, **{"DATALOADER.SKIP_CORRUPT": True, "DATALOADER.DATA_PATH": "device"})
    dev = build_train_loader(dev_cfg, records, known_corrupt=bad)
    assert pil.dataset.num_skipped == dev.dataset.num_skipped == 3
    drawn_pil, drawn_dev = _batches(pil, 1), _batches(dev, 1)
    bad_paths = {records[i][0] for i in bad}
    for (xa, pa, qa), (xb, pb, qb) in zip(drawn_pil, drawn_dev):
        assert qa == qb and not bad_paths & set(qb) and torch.equal(pa, pb)
        torch.testing.assert_close(xb, xa, atol=1e-6, rtol=0)


def test_jpeg_decoders_match_pillow_and_fall_back_on_bad_files(tiny_synthetic_root, tmp_path):
    path = sorted((tiny_synthetic_root / "synthetic" / "query").glob("*.jpg"))[0]
    blob = path.read_bytes()
    reference = decode_jpeg_bytes(blob, "pil")
    for name in available_decoders():
        assert np.array_equal(decode_jpeg_bytes(blob, name), reference), name
        assert np.array_equal(np.asarray(read_image(path, name)), reference), name
    assert resolve_decoder("auto") in available_decoders()
    assert resolve_decoder("pil") == "pil"
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(blob[: len(blob) // 2])
    for name in available_decoders():  # Pillow has the last word: its message, a DatasetError
        with pytest.raises(Exception, match="cannot decode image .*cut.jpg.*truncated"):
            read_image(truncated, name)


def test_training_with_the_device_path_reaches_the_pil_path_map(tiny_synthetic_root, tmp_path, capsys):
    runs = {}
    for path in ("pil", "device"):
        out = tmp_path / path
        opts = tiny_train_opts(tiny_synthetic_root, out, **{"DATALOADER.DATA_PATH": path,
                                                            "DATALOADER.CACHE_DIR": tmp_path / "cache",
                                                            "SOLVER.EVAL_PERIOD": 2})
        assert main(["train", *opts]) == 0, capsys.readouterr().err[-2000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[path] = {"mAP": json.loads((out / "results.json").read_text())["mAP"],
                      "loss": [r["loss"] for r in rows if r["type"] == "train"]}
    # The same images in the same order: the runs differ only by float rounding.
    assert len(runs["pil"]["loss"]) == 2 and runs["pil"]["loss"][1] < runs["pil"]["loss"][0]
    np.testing.assert_allclose(runs["device"]["loss"], runs["pil"]["loss"], rtol=1e-3)
    assert abs(runs["pil"]["mAP"] - runs["device"]["mAP"]) <= 0.02, runs
