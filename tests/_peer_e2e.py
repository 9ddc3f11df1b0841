"""A foreign checkpoint through every way in: `test`, `extract`, FeatureExtractor, a search
gallery ingest and `export --target boxmot` (ONNX). Shared by the per-peer test files."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from strongreid import FeatureExtractor
from strongreid.cli import main
from strongreid.config import load_config

OPTS = ["MODEL.DEVICE", "cpu", "MODEL.NAME", "resnet18", "MODEL.PRETRAIN_CHOICE", "none",
        "MODEL.AMP", "off", "MODEL.CHANNELS_LAST", "off", "TEST.IMS_PER_BATCH", "8"]


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=1)


def peer_pixels(images: list[np.ndarray], size: tuple[int, int], resample: Image.Resampling,
                mean: list[float], std: list[float]) -> torch.Tensor:
    """The peer's test transform written out: PIL resize with its filter, /255, (x - mean) / std."""
    h, w = size
    batch = [torch.from_numpy(np.asarray(Image.fromarray(im).resize((w, h), resample), dtype=np.float32) / 255)
             for im in images]
    x = torch.stack(batch).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def crops(n: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random person-sized crops (of another size than any test input, so all are resized)."""
    g = np.random.default_rng(seed)
    base = g.integers(0, 256, size=(n, 20, 9, 3)).astype(np.uint8)
    return [np.asarray(Image.fromarray(b).resize((61, 143), Image.Resampling.BILINEAR)) for b in base]


def through_every_entry(path: Path, data_root: Path, tmp: Path, *, source: str, fmt: str,
                        size: tuple[int, int], reference: Callable[[torch.Tensor], torch.Tensor],
                        resample: Image.Resampling, mean: list[float], std: list[float],
                        train_opts: list[str]) -> None:
    """`path` works wherever a model file is taken, with the peer's own input size and transform."""
    # strongreid test: the user's config says resnet18 at 64x32; the file decides.
    out = tmp / "test"
    assert main(["test", *train_opts, "OUTPUT_DIR", str(out), "TEST.WEIGHT", str(path)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["mAP"] <= 1 and results["num_query"] > 0
    assert source in (out / "log.txt").read_text()

    # FeatureExtractor: the peer's resize filter, size and statistics, then its forward, L2-normalised.
    images = crops(4)
    extractor = FeatureExtractor(load_config(None, OPTS), path, device="cpu")
    assert extractor.checkpoint_format == fmt
    expected = F.normalize(reference(peer_pixels(images, size, resample, mean, std)), dim=1)
    got = extractor(images)
    assert cosines(got, expected).min() >= 0.9999

    # extract: a folder of images to .npz, the extractor's features.
    folder = tmp / "crops"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:04d}_c1s1_{i:06d}_00.png")
    npz = tmp / "feats.npz"
    assert main(["extract", *OPTS, "TEST.WEIGHT", str(path), "--images", str(folder), "--out", str(npz)]) == 0
    stored = np.load(npz)
    feats = torch.from_numpy(np.asarray(stored["feats"], dtype=np.float32))
    order = [int(Path(str(p)).name[:4]) for p in stored["paths"]]
    assert cosines(feats, got[order]).min() >= 0.9999

    # A search gallery: ingest the crops folder, the stored vectors are the extractor's.
    from strongreid.search.ingest import ingest
    from strongreid.search.store import open_store

    store = open_store(str(tmp / "gallery.db"))
    try:
        stats = ingest(store, extractor, tmp / "thumbs", crops=[str(folder)], progress=False)
        assert stats.added == len(images) and store.count() == len(images)
        hits = store.search(got[:1].numpy(), k=1)[0]
        assert hits[0].score >= 0.9999
    finally:
        store.close()

    # export --target boxmot: ONNX within 1e-4 of PyTorch, the sidecar tells BoxMOT the peer's size.
    onnx_path = tmp / "reid.onnx"
    printed = _run(["export", "--target", "boxmot", "--no-preprocessing-check", "--out", str(onnx_path),
                    *OPTS, "TEST.WEIGHT", str(path)])
    diff = float(re.search(r"parity: max \|onnx - pytorch\| = (\S+)", printed).group(1))
    assert diff <= 1e-4
    # The line names the architecture in the file (the peer's), not the command line's MODEL.NAME.
    import onnx

    arch = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}["arch"]
    assert f"exported {arch} (onnx) to {onnx_path}" in printed, (arch, printed)
    sidecar = json.loads((tmp / "reid.onnx.metadata.json").read_text())
    assert sidecar["model_kwargs"] == {"img_size": list(size)}
    assert sidecar["interpolation"] == {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}[resample]


def _run(argv: list[str]) -> str:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv) == 0
    return buffer.getvalue()
