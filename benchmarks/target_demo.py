"""What the demo-size benchmarks against an mAP target share: their options, a fresh run, the verdict.

A benchmark script builds its parser with `demo_parser`, adds its own options, and hands its
config and overrides to `train_against_target`, which trains on the synthetic set (drawn first
when missing), prints one JSON line and returns the exit status (1 when the target was missed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def demo_parser(doc: str, name: str, size: tuple[int, int], target: float) -> argparse.ArgumentParser:
    """--size, --data, --out, --target and --opts, with this benchmark's defaults."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=list(size), metavar=("H", "W"))
    parser.add_argument("--data", default=str(ROOT / "data"), help="DATASETS.ROOT_DIR")
    parser.add_argument("--out", default=str(ROOT / "runs" / name))
    parser.add_argument("--target", type=float, default=target)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="more KEY VALUE pairs")
    return parser


def train_against_target(name: str, config: str, opts: list[str], args: argparse.Namespace,
                         **report: Any) -> int:
    """Train `config` with `opts` (then the user's --opts) into a fresh --out; print the verdict."""
    from strongreid.config import load_config
    from strongreid.data.synthetic import generate
    from strongreid.workflows import train

    data = Path(args.data)
    if not (data / "synthetic").is_dir():
        generate(str(data / "synthetic"))
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # a benchmark always starts afresh
    h, w = args.size
    cfg = load_config(str(ROOT / "configs" / config), [
        "INPUT.SIZE_TRAIN", f"[{h}, {w}]", "INPUT.SIZE_TEST", f"[{h}, {w}]",
        "DATASETS.ROOT_DIR", str(data), "OUTPUT_DIR", str(out), *opts, *args.opts,
    ])
    t0 = time.perf_counter()
    train(cfg)
    elapsed = time.perf_counter() - t0
    res = json.loads((out / "results.json").read_text())
    ok = res["mAP"] >= args.target
    print(json.dumps({"benchmark": name, **report, "size": [h, w], "epochs": cfg.SOLVER.MAX_EPOCHS,
                      "mAP": round(res["mAP"], 4), "rank1": round(res["rank1"], 4),
                      "mINP": round(res["mINP"], 4), "target_mAP": args.target,
                      "reached": ok, "wall_s": round(elapsed, 1)}))
    return 0 if ok else 1
