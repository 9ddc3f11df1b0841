"""How far colour alone gets on the synthetic data set: HSV histograms + cosine distance.

The synthetic data is meant to need a learned model, so this number must stay well below
what a small CNN reaches (the target is under half its mAP). Run:

    .venv/bin/python benchmarks/histogram_baseline.py --root data/synthetic
    .venv/bin/python benchmarks/histogram_baseline.py --generate   # writes a default set first

It prints mAP and rank-1 of three features: one histogram of the whole image; one
histogram per horizontal stripe (which also captures where colours sit: top vs trousers);
and the same on the central columns with square-rooted bins (Hellinger), which keeps the
large background bins from swamping the person's colours. The last is the strongest, so it
is the figure to compare with a trained model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from strongreid.data.datasets import ImageRecord, build_dataset
from strongreid.evaluation import evaluate_features

# (label, horizontal stripes, centre crop + sqrt)
VARIANTS = (
    ("global", 1, False),
    ("6 stripes", 6, False),
    ("6 stripes centre sqrt", 6, True),
)


def hsv_histogram(
    path: str | Path,
    stripes: int,
    bins: tuple[int, int, int],
    centre: bool = False,
    sqrt: bool = False,
) -> np.ndarray:
    """Concatenated per-stripe HSV histograms, each normalised to sum 1 (before any sqrt).

    `centre` keeps the middle 5/8 of the columns, where the person stands.
    """
    img = Image.open(path).convert("RGB")
    if centre:
        w = img.width
        img = img.crop((w * 3 // 16, 0, w - w * 3 // 16, img.height))
    hsv = np.asarray(img.convert("HSV"), np.int64)
    idx = [(hsv[..., c] * b) >> 8 for c, b in enumerate(bins)]
    flat = (idx[0] * bins[1] + idx[1]) * bins[2] + idx[2]
    size = bins[0] * bins[1] * bins[2]
    parts = []
    for rows in np.array_split(flat, stripes, axis=0):
        h = np.bincount(rows.ravel(), minlength=size).astype(np.float64)
        h /= h.sum()
        parts.append(np.sqrt(h) if sqrt else h)
    return np.concatenate(parts)


def _labels(records: list[ImageRecord]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([r.pid for r in records]), np.array([r.camid for r in records])


def evaluate_root(root: Path, dataset: str = "synthetic") -> dict[str, tuple[float, float]]:
    """mAP and rank-1 of each histogram variant on the query vs gallery split of `root`."""
    ds = build_dataset(dataset, str(root))
    (q_pids, q_cams), (g_pids, g_cams) = _labels(ds.query), _labels(ds.gallery)
    out = {}
    for label, stripes, tuned in VARIANTS:
        q = np.stack([hsv_histogram(r.path, stripes, (8, 4, 4), tuned, tuned) for r in ds.query])
        g = np.stack([hsv_histogram(r.path, stripes, (8, 4, 4), tuned, tuned) for r in ds.gallery])
        res = evaluate_features(q, g, q_pids, g_pids, q_cams, g_cams, metric="cosine")
        out[label] = (res.mAP, res.rank(1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="a Market-layout folder (e.g. data/synthetic)")
    parser.add_argument("--generate", action="store_true", help="generate a default set first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="synthetic", help="registered Market-layout loader")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    parser.add_argument("--compare", default=None,
                        help="results.json of a trained model: print its mAP next to the baseline's")
    args = parser.parse_args(argv)
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "synthetic"
        if args.generate or args.root is None:
            from strongreid.data.synthetic import generate

            start = time.perf_counter()
            counts = generate(root, seed=args.seed)
            print(f"generated {counts['images']} images in {time.perf_counter() - start:.1f}s")
        for label, (m_ap, rank1) in evaluate_root(root, args.dataset).items():
            print(f"HSV 8x4x4 {label:<22} mAP {m_ap:.3f}  rank-1 {rank1:.3f}")
            figures[label.strip()] = {"mAP": m_ap, "rank1": rank1}
    best = max(figures.values(), key=lambda f: f["mAP"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"variants": figures, "best": best}, indent=2))
    if args.compare:
        model = json.loads(Path(args.compare).read_text())
        ratio = best["mAP"] / model["mAP"] if model["mAP"] else float("inf")
        print(f"trained model mAP {model['mAP']:.3f} rank-1 {model['rank1']:.3f}; best colour "
              f"histogram mAP {best['mAP']:.3f} = {ratio:.2f} of the model's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
