"""JPEG decoding to RGB uint8 with each available decoder, on the same files.

    PYTHONPATH=src python benchmarks/jpeg_decoders.py [--root data/synthetic] [--limit 1000]

Reports images/s of each decoder (one thread, files read into memory first, so only decoding is
timed) as a ratio against Pillow in the same process, and whether its pixels equal Pillow's: the
decoded-image cache must hold what the PIL loader would have produced.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from strongreid.data.decode import available_decoders, decode_jpeg_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="data/synthetic")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(args.root, "**", "*.jpg"), recursive=True))[: args.limit]
    if not files:
        sys.exit(f"no .jpg under {args.root}: run `strongreid synth --out {args.root}` first")
    blobs = [open(f, "rb").read() for f in files]
    reference = [decode_jpeg_bytes(b, "pil") for b in blobs]
    shape = reference[0].shape
    print(f"{len(blobs)} JPEGs from {args.root} (first {shape[1]}x{shape[0]}), best of {args.repeat} interleaved rounds")
    names = available_decoders()
    best = dict.fromkeys(names, float("inf"))
    outs = {}
    for _ in range(args.repeat):  # interleaved rounds: every decoder sees the same machine load
        for name in names:
            t0 = time.perf_counter()
            outs[name] = [decode_jpeg_bytes(b, name) for b in blobs]
            best[name] = min(best[name], time.perf_counter() - t0)
    base = len(blobs) / best["pil"]
    for name in names:
        out = outs[name]
        equal = all(np.array_equal(a, b) for a, b in zip(out, reference))
        diff = max(int(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(out, reference))
        ips = len(blobs) / best[name]
        print(f"{name:12s} {ips:9.0f} img/s  x{ips / base:4.2f} vs pil  pixels equal to pil: {equal} (max diff {diff})")


if __name__ == "__main__":
    main()
