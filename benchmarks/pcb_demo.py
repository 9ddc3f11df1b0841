"""PCB on the synthetic set: configs/demo_bot.yml with MODEL.HEAD 'pcb', against an mAP target.

The demo recipe (ResNet-18 from scratch, BNNeck-free PCB head here, CE + triplet + center loss,
16 epochs) with layumi's six horizontal stripes. PCB needs a feature map at least as high as
the number of stripes; ResNet-18 with last stride 1 gives H/16 rows, so the default input is
96x48 (6 x 3 map, the demo's 2:1 aspect as layumi's 384x192).

    python benchmarks/pcb_demo.py                      # 6 parts at 96x48, target mAP 0.60
    python benchmarks/pcb_demo.py --parts 4 --size 64 32
    python benchmarks/pcb_demo.py --opts SOLVER.MAX_EPOCHS 8

Prints the final mAP / rank-1, the wall time, and whether the target was reached (exit status
1 when not).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=6)
    parser.add_argument("--size", type=int, nargs=2, default=[96, 48], metavar=("H", "W"))
    parser.add_argument("--data", default=str(ROOT / "data"), help="DATASETS.ROOT_DIR")
    parser.add_argument("--out", default=str(ROOT / "runs" / "pcb_demo"))
    parser.add_argument("--target", type=float, default=0.60)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="more KEY VALUE pairs")
    args = parser.parse_args(argv)

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
    cfg = load_config(str(ROOT / "configs" / "demo_bot.yml"), [
        "MODEL.HEAD", "pcb", "MODEL.PCB_PARTS", str(args.parts),
        "INPUT.SIZE_TRAIN", f"[{h}, {w}]", "INPUT.SIZE_TEST", f"[{h}, {w}]",
        "DATASETS.ROOT_DIR", str(data), "OUTPUT_DIR", str(out), *args.opts,
    ])
    t0 = time.perf_counter()
    train(cfg)
    elapsed = time.perf_counter() - t0
    res = json.loads((out / "results.json").read_text())
    ok = res["mAP"] >= args.target
    print(json.dumps({"benchmark": "pcb_demo", "parts": args.parts, "size": [h, w],
                      "mAP": round(res["mAP"], 4), "rank1": round(res["rank1"], 4),
                      "mINP": round(res["mINP"], 4), "target_mAP": args.target,
                      "reached": ok, "wall_s": round(elapsed, 1)}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
