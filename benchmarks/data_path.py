"""Images/s and data-wait share of the two training data paths, through the real trainer loop.

    PYTHONPATH=src python benchmarks/data_path.py [--root data] [--iters 6]
    PYTHONPATH=src python benchmarks/data_path.py --summarize runs/bench-cuda/dp-*   # CLI runs

'pil' is the original loader (PIL decode + per-image transforms in DATALOADER.NUM_WORKERS
worker processes); 'device' reads the decoded-image cache and augments the batch on the
training device (docs/data-path.md). Each case builds a Trainer for
configs/softmax_triplet_with_center.yml on the synthetic set (`strongreid synth --out
data/synthetic`), runs a one-iteration epoch to start the workers and build the cache, then
times an epoch of --iters iterations (the trainer's own img/s and data-wait share). Cases: ResNet-18
at 64x32 and ResNet-50 at 256x128. `--summarize` instead prints the last epoch's figures of
finished `strongreid train` runs (their metrics.jsonl), as benchmarks/cuda_all.sh uses it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# (backbone, size, batch): the demo's ResNet-18 at 64x32 and the paper's ResNet-50 at 256x128, whose
# CPU step takes a minute on 2 shared cores, hence the small batch there (--r50-batch).
CASES = {"r18-64x32": ("resnet18", "[64, 32]", 64), "r50-256x128": ("resnet50", "[256, 128]", 8)}


class FirstBatches:
    """A train loader cut to its first `n` batches, keeping what Trainer.train_one_epoch reads."""

    def __init__(self, loader, n: int) -> None:
        self.loader, self.n = loader, n
        self.sampler = getattr(loader, "sampler", None)
        self.batch_sampler = getattr(loader, "batch_sampler", None)
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return min(self.n, len(self.loader))

    def __iter__(self):
        return itertools.islice(iter(self.loader), len(self))


def run_case(args: argparse.Namespace, case: str, path: str, out: Path) -> dict:
    from strongreid.config import load_config
    from strongreid.engine.trainer import Trainer

    model, size, batch = CASES[case]
    if case.startswith("r50") and args.r50_batch:
        batch = args.r50_batch
    opts = ["MODEL.DEVICE", args.device, "MODEL.NAME", model, "MODEL.PRETRAIN_CHOICE", "none",
            "MODEL.AMP", args.amp, "INPUT.SIZE_TRAIN", size, "INPUT.SIZE_TEST", size,
            "DATASETS.NAMES", "synthetic", "DATASETS.ROOT_DIR", args.root,
            "DATALOADER.NUM_WORKERS", str(args.workers), "DATALOADER.DATA_PATH", path,
            "DATALOADER.CACHE_DIR", str(out / "cache"), "SOLVER.IMS_PER_BATCH", str(batch),
            "SOLVER.LOG_PERIOD", "1000", "OUTPUT_DIR", str(out / f"{case}-{path}")]
    cfg = load_config(str(REPO / "configs" / "softmax_triplet_with_center.yml"), opts)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)  # builds the cache on first use ('device')
    setup_s = time.perf_counter() - t0
    full = trainer.loader
    stats = {"images_per_s": float("nan"), "data_wait": float("nan")}
    if not args.loader_only:
        trainer.loader = FirstBatches(full, 1)
        trainer.train_one_epoch(1)  # warm-up: worker start, allocator, first cache reads
        trainer.loader = FirstBatches(full, args.iters)
        stats = trainer.train_one_epoch(2)
    # The loader alone (no model): how many images/s this path can deliver at most.
    feed = FirstBatches(full, args.loader_iters)
    full.sampler.set_epoch(3)
    t1, n = time.perf_counter(), 0
    for images, *_ in feed:
        n += images.shape[0]
    loader_ips = n / (time.perf_counter() - t1)
    host_ips = float("nan")
    if path == "device":
        # Its host side alone (cache gather + the per-image decisions): what feeds a GPU, where
        # the augmentation itself runs on the device.
        full.sampler.set_epoch(4)
        t1, n = time.perf_counter(), 0
        for images, _params, _index in itertools.islice(full._host_batches(), args.loader_iters):
            n += images.shape[0]
        host_ips = n / (time.perf_counter() - t1)
    return {"case": case, "path": path, "img/s": stats["images_per_s"], "data_wait": stats["data_wait"],
            "setup_s": setup_s, "loader_img/s": loader_ips, "host_img/s": host_ips, "batch": batch, "device": str(trainer.device), "amp": str(trainer.amp_dtype)}


def summarize(dirs: list[str]) -> None:
    print(f"{'run':40s} {'epoch':>5s} {'img/s':>9s} {'data wait':>9s} {'mAP':>6s}")
    for d in dirs:
        rows = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()] \
            if (Path(d) / "metrics.jsonl").is_file() else []
        train = [r for r in rows if r.get("type") == "train"]
        evals = [r for r in rows if r.get("type") == "eval"]
        if not train:
            print(f"{Path(d).name:40s} (no finished epoch: see {d}/log.txt)")
            continue
        last = train[-1]
        m = f"{100 * evals[-1]['mAP']:5.1f}" if evals else "-"
        print(f"{Path(d).name:40s} {last['epoch']:5d} {last['images_per_s']:9.1f} {100 * last['data_wait']:8.0f}% {m:>6s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="data", help="DATASETS.ROOT_DIR holding synthetic/")
    ap.add_argument("--iters", type=int, default=6, help="timed iterations per case")
    ap.add_argument("--r50-batch", type=int, default=0, help="batch of the ResNet-50 case (default 8)")
    ap.add_argument("--loader-iters", type=int, default=8, help="batches of the loader-only pass")
    ap.add_argument("--workers", type=int, default=2, help="DATALOADER.NUM_WORKERS of the pil path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--loader-only", action="store_true", help="skip the training epochs")
    ap.add_argument("--summarize", nargs="+", metavar="OUTPUT_DIR")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    if not (Path(args.root) / "synthetic").is_dir():
        sys.exit(f"no synthetic set under {args.root}: run `strongreid synth --out {args.root}/synthetic`")
    logging.getLogger("strongreid").setLevel(logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            for path in ("pil", "device"):
                r = run_case(args, case, path, Path(tmp))
                logging.getLogger("strongreid").handlers.clear()
                results.append(r)
                print(f"{case:12s} {path:6s} {r['img/s']:8.1f} img/s  data wait {100 * r['data_wait']:4.0f}%  "
                      f"loader alone {r['loader_img/s']:7.0f} img/s  "
                      + (f"host side alone {r['host_img/s']:7.0f} img/s  " if path == "device" else "")
                      + f"(batch {r['batch']}, {r['device']}, amp {r['amp']}, setup {r['setup_s']:.1f} s)", flush=True)
    for case in args.cases.split(","):
        if args.loader_only:
            continue
        a, b = (next(r for r in results if r["case"] == case and r["path"] == p) for p in ("pil", "device"))
        print(f"{case}: device path x{b['img/s'] / a['img/s']:.2f} training img/s and x"
              f"{b['loader_img/s'] / a['loader_img/s']:.2f} loader img/s of the pil path; data wait "
              f"{100 * a['data_wait']:.0f}% -> {100 * b['data_wait']:.0f}%")
    print(f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
