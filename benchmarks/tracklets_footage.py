"""Footage of the night domain cut into tracklets: how long it takes and how pure it is.

    python benchmarks/tracklets_footage.py                       # 48 people, 4 cams, 300 frames
    python benchmarks/tracklets_footage.py --people 8 --frames 60  # a quick look

Writes `strongreid synth-video --domain night` footage, then cuts it with `strongreid
tracklets` three ways: gt.txt's tracks, and det.txt linked by BoxMOT's ByteTrack and
OC-SORT. For each: wall time, tracklets, crops, and purity against gt.txt (the share of crops
that show their tracklet's majority person; `fragmentation` = tracklets per person-camera
pass). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--people", type=int, default=48)
    p.add_argument("--cams", type=int, default=4)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--fps", type=float, default=5.0)
    p.add_argument("--domain", default="night")
    p.add_argument("--per-tracklet", type=int, default=10)
    p.add_argument("--min-length", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="folder for the footage and outputs (kept)")
    args = p.parse_args()

    from strongreid.data.synthetic_video import generate_footage
    from strongreid.data.tracklets import cut_tracklets, tracklet_purity

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tracklets_bench_"))
    footage = work / "footage"
    if footage.exists():
        shutil.rmtree(footage)
    t0 = time.perf_counter()
    generate_footage(footage, people=args.people, cams=args.cams, frames=args.frames,
                     fps=args.fps, seed=args.seed, domain=args.domain)
    result: dict = {"footage": {k: getattr(args, k) for k in ("people", "cams", "frames", "fps",
                                                               "domain", "seed")},
                    "synth_video_s": round(time.perf_counter() - t0, 2), "runs": {}}
    for boxes, tracker in (("gt", None), ("det", "bytetrack"), ("det", "ocsort")):
        out = work / f"tracklets_{tracker or boxes}"
        if out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        stats = cut_tracklets(footage, out, boxes=boxes, tracker=tracker,
                              per_tracklet=args.per_tracklet, min_length=args.min_length)
        seconds = time.perf_counter() - t0
        purity = tracklet_purity(out, footage)
        result["runs"][tracker or boxes] = {
            "seconds": round(seconds, 2), "tracklets": stats.tracklets, "crops": stats.crops,
            "purity": round(purity["purity"], 3), "fragmentation": round(purity["fragmentation"], 3)}
    print(json.dumps(result, indent=1))
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
