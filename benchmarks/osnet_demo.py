"""OSNet x0.25 against the ResNet-18 demo: mAP, training time, and CPU inference in ONNX fp32 / int8.

Both models train from random init on the synthetic set with their demo configs
(`configs/demo.yml`, `configs/osnet_x0_25_demo.yml`), one after the other in this process, so
both see the same machine load. Then both are exported to ONNX fp32 and int8 (onnxruntime static
quantisation, calibrated on the training images) and timed with onnxruntime at batch 1 and 64,
interleaved over rounds (best kept). Figures are reported side by side and as OSNet / ResNet-18
ratios, which compare across machines (the absolute ones depend on the CPU and its load).

    python benchmarks/osnet_demo.py --out runs/osnet_bench              # train both, then ONNX
    python benchmarks/osnet_demo.py --out runs/osnet_bench --no-onnx    # training only
    python benchmarks/osnet_demo.py --out runs/osnet_bench --onnx-only  # ONNX of those runs
    python benchmarks/osnet_demo.py --epochs 4                          # shorter runs, same comparison
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from strongreid.config import load_config
from strongreid.workflows import build_trainer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = (("ResNet-18 demo", REPO / "configs" / "demo.yml"),
           ("OSNet x0.25 demo", REPO / "configs" / "osnet_x0_25_demo.yml"))
BATCHES = (1, 64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data", help="DATASETS.ROOT_DIR (default: data)")
    parser.add_argument("--out", default=None, help="keep the two runs here (default: a temporary folder)")
    parser.add_argument("--epochs", type=int, default=None, help="override SOLVER.MAX_EPOCHS of both")
    parser.add_argument("--workers", type=int, default=2, help="DATALOADER.NUM_WORKERS")
    parser.add_argument("--no-onnx", action="store_true", help="train only")
    parser.add_argument("--onnx-only", action="store_true", help="time the runs already in --out")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved ONNX timing rounds")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per batch size and round")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser.parse_args(argv)


def config_for(config: Path, root: str, out: Path, epochs: int | None, workers: int):
    opts = ["DATASETS.ROOT_DIR", root, "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu",
            "DATALOADER.NUM_WORKERS", str(workers)]
    if epochs is not None:
        opts += ["SOLVER.MAX_EPOCHS", str(epochs), "SOLVER.EVAL_PERIOD", str(epochs),
                 "SOLVER.CHECKPOINT_PERIOD", str(epochs)]
    return load_config(str(config), opts)


def train(cfg) -> dict:
    """Train one config; mAP / R1 of its final evaluation, wall time of `fit`, epoch times."""
    out = Path(cfg.OUTPUT_DIR)
    trainer = build_trainer(cfg)
    t0 = time.perf_counter()
    results = trainer.fit() or {}
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["type"] == "train"]
    return {
        "model": cfg.MODEL.NAME, "size": list(cfg.INPUT.SIZE_TEST), "epochs": cfg.SOLVER.MAX_EPOCHS,
        "params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "mAP": results.get("mAP"), "rank1": results.get("rank1"),
        "fit_wall_s": wall, "train_s": sum(r["time"] for r in epochs),
        "train_images_per_s": sum(r["images_per_s"] for r in epochs) / len(epochs),
    }


def onnx_runners(cfg, work: Path) -> dict[str, object]:
    """onnxruntime sessions of the run's best.pt in fp32 and int8 (calibrated on training images)."""
    from strongreid.data.splits import load_splits
    from strongreid.deploy.export import export_model
    from strongreid.deploy.quantize import export_int8
    from strongreid.deploy.runtimes import run_onnx

    weights = Path(cfg.OUTPUT_DIR) / "best.pt"
    threads = torch.get_num_threads()
    fp32, _, _ = export_model(cfg, "onnx", work / "fp32.onnx", weights=weights)
    calib = work / "calib.txt"
    calib.write_text("\n".join(str(Path(r.path).resolve()) for r in load_splits(cfg, need_train=True).train))
    int8, report = export_int8(cfg, work / "int8.onnx", calib, weights=weights)
    return {"fp32": run_onnx(fp32, threads), "int8": run_onnx(int8, threads),
            "int8_cosine": report["mean_cosine"]}


def images_per_s(run, x: np.ndarray, iters: int) -> float:
    run(x)
    run(x)
    start = time.perf_counter()
    for _ in range(iters):
        run(x)
    return len(x) * iters / (time.perf_counter() - start)


def time_onnx(cfgs: dict, rounds: int, iters: int) -> dict[str, dict[str, float]]:
    """Images/s per model, precision and batch size, best of interleaved rounds."""
    speeds: dict[str, dict[str, float]] = {label: {} for label in cfgs}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for label, cfg in cfgs.items():
            work = Path(tmp) / label.replace(" ", "_")
            work.mkdir()
            runners[label] = onnx_runners(cfg, work)
            speeds[label]["int8_cosine"] = runners[label]["int8_cosine"]
        rng = np.random.default_rng(0)
        inputs = {label: rng.standard_normal((max(BATCHES), 3, *cfg.INPUT.SIZE_TEST)).astype(np.float32)
                  for label, cfg in cfgs.items()}
        for _ in range(rounds):
            for label in cfgs:
                for precision in ("fp32", "int8"):
                    for batch in BATCHES:
                        key = f"{precision}_b{batch}"
                        rate = images_per_s(runners[label][precision], inputs[label][:batch], iters)
                        speeds[label][key] = max(speeds[label].get(key, 0.0), rate)
    return speeds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (Path(args.root) / "synthetic").is_dir():
        from strongreid.data.synthetic import generate

        generate(str(Path(args.root) / "synthetic"))
    if args.onnx_only and not args.out:
        raise SystemExit("--onnx-only times the runs in --out: give --out")
    keep = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="osnet_demo_"))
    cfgs = {label: config_for(config, args.root, keep / config.stem, args.epochs, args.workers)
            for label, config in CONFIGS}
    figures_file = keep / "training.json"
    if args.onnx_only:
        figures = json.loads(figures_file.read_text())
    else:
        figures = {label: train(cfg) for label, cfg in cfgs.items()}
        figures_file.write_text(json.dumps(figures, indent=2))
    threads = torch.get_num_threads()
    (ref_label, _), (osn_label, _) = CONFIGS
    ref, osn = figures[ref_label], figures[osn_label]
    print(f"{'':18} {'params':>9} {'size':>7} {'ep':>3} {'mAP':>6} {'R1':>6} {'train s':>8} "
          f"{'fit s':>7} {'train img/s':>12}")
    for label, f in figures.items():
        print(f"{label:18} {f['params']:9d} {'x'.join(map(str, f['size'])):>7} {f['epochs']:3d} "
              f"{100 * f['mAP']:6.1f} {100 * f['rank1']:6.1f} {f['train_s']:8.1f} {f['fit_wall_s']:7.1f} "
              f"{f['train_images_per_s']:12.1f}")
    print(f"OSNet / ResNet-18: mAP {100 * osn['mAP'] / ref['mAP']:.1f} % of the ResNet-18 demo's, "
          f"training time {osn['train_s'] / ref['train_s']:.2f}x ({threads} threads)")
    report = {"training": figures}
    if not args.no_onnx:
        speeds = time_onnx(cfgs, args.rounds, args.iters)
        print(f"onnxruntime, {threads} threads, images/s (best of {args.rounds} rounds of {args.iters} calls):")
        print(f"{'':18} {'fp32 b1':>9} {'fp32 b64':>9} {'int8 b1':>9} {'int8 b64':>9} {'int8 cos':>9}")
        for label, s in speeds.items():
            print(f"{label:18} {s['fp32_b1']:9.1f} {s['fp32_b64']:9.1f} {s['int8_b1']:9.1f} "
                  f"{s['int8_b64']:9.1f} {s['int8_cosine']:9.5f}")
        ratios = {k: speeds[osn_label][k] / speeds[ref_label][k]
                  for k in ("fp32_b1", "fp32_b64", "int8_b1", "int8_b64")}
        print("OSNet / ResNet-18 images/s: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
        report.update({"onnx": speeds, "onnx_ratios": ratios})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
