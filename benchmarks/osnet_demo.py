"""OSNet x0.25 against the ResNet-18 demo: mAP, training and inference images/s, on the CPU.

Both models train with the same recipe from random init on the synthetic set
(`configs/demo_bot.yml` and `configs/osnet_x0_25_demo.yml`, which differ only in MODEL.NAME and
LAST_STRIDE), one after the other in this process; inference is timed on the same batch for
both in eval mode. Figures are reported side by side and as OSNet / ResNet-18 ratios, so they
compare across machines (the absolute ones depend on the CPU and on what else runs on it).

    python benchmarks/osnet_demo.py                  # full 16-epoch recipes (minutes)
    python benchmarks/osnet_demo.py --epochs 4       # shorter runs, same comparison
    python benchmarks/osnet_demo.py --root data      # DATASETS.ROOT_DIR (generated if missing)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from strongreid.config import load_config
from strongreid.workflows import build_trainer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = (("ResNet-18 demo", REPO / "configs" / "demo_bot.yml"),
           ("OSNet x0.25 demo", REPO / "configs" / "osnet_x0_25_demo.yml"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data", help="DATASETS.ROOT_DIR (default: data)")
    parser.add_argument("--epochs", type=int, default=None, help="override SOLVER.MAX_EPOCHS")
    parser.add_argument("--workers", type=int, default=2, help="DATALOADER.NUM_WORKERS")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser.parse_args(argv)


def inference_rate(model: torch.nn.Module, batch: int = 128, size=(64, 32), reps: int = 5) -> float:
    """Images/s of the eval forward (best of `reps` after one warm-up) on the CPU."""
    model = model.eval().cpu()
    x = torch.randn(batch, 3, *size)
    best = float("inf")
    with torch.inference_mode():
        model(x)
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t)
    return batch / best


def run_one(config: Path, root: str, out: Path, epochs: int | None, workers: int) -> dict:
    opts = ["DATASETS.ROOT_DIR", root, "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu",
            "DATALOADER.NUM_WORKERS", str(workers)]
    if epochs is not None:
        opts += ["SOLVER.MAX_EPOCHS", str(epochs), "SOLVER.EVAL_PERIOD", str(epochs),
                 "SOLVER.CHECKPOINT_PERIOD", str(epochs)]
    cfg = load_config(str(config), opts)
    trainer = build_trainer(cfg)
    t0 = time.perf_counter()
    results = trainer.fit() or {}
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rates = [r["images_per_s"] for r in rows if r["type"] == "train"]
    model = trainer.model
    return {
        "model": cfg.MODEL.NAME,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "mAP": results.get("mAP"), "rank1": results.get("rank1"),
        "train_images_per_s": sum(train_rates) / len(train_rates),
        "infer_images_per_s": inference_rate(model, size=tuple(cfg.INPUT.SIZE_TEST)),
        "wall_s": wall, "epochs": cfg.SOLVER.MAX_EPOCHS,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (Path(args.root) / "synthetic").is_dir():
        from strongreid.data.synthetic import generate

        generate(str(Path(args.root) / "synthetic"))
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in CONFIGS:
            figures[label] = run_one(config, args.root, Path(tmp) / config.stem, args.epochs,
                                     args.workers)
    ref, osn = (figures[label] for label, _ in CONFIGS)
    print(f"{'':18} {'params':>9} {'mAP':>6} {'R1':>6} {'train img/s':>12} {'infer img/s':>12} "
          f"{'wall s':>7}")
    for label, f in figures.items():
        print(f"{label:18} {f['params']:9d} {100 * f['mAP']:6.1f} {100 * f['rank1']:6.1f} "
              f"{f['train_images_per_s']:12.1f} {f['infer_images_per_s']:12.1f} {f['wall_s']:7.0f}")
    ratios = {k: osn[k] / ref[k] for k in ("train_images_per_s", "infer_images_per_s", "params")}
    print(f"OSNet / ResNet-18: training {ratios['train_images_per_s']:.2f}x, inference "
          f"{ratios['infer_images_per_s']:.2f}x the images/s, {ratios['params']:.3f}x the "
          f"parameters; mAP {100 * (osn['mAP'] - ref['mAP']):+.1f} points "
          f"({torch.get_num_threads()} threads, {ref['epochs']} epochs)")
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
