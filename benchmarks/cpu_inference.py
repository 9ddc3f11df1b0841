"""CPU inference of a trained model: PyTorch eager vs ONNX Runtime fp32 / int8 and OpenVINO IR.

For each runtime: the cosine of its features to PyTorch eager's on the test split (query +
gallery, preprocessed once with the test transform), the mAP / rank-1 it gives and the change
from eager's, and images/s at batch 1 and 32 with the ratio to eager measured in this process
(the ratios compare across machines, the absolute figures do not). The int8 model is calibrated
on the first CALIB_MAX_IMAGES images of the training split.

    python benchmarks/cpu_inference.py --config runs/demo/config.yaml --weights runs/demo/best.pt
    python benchmarks/cpu_inference.py ... --threads 2 --iters 30 --out runs/cpu_inference.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from strongreid.config import load_config
from strongreid.data.splits import load_splits
from strongreid.deploy import FeatureExtractor
from strongreid.deploy.export import build_inference_model, export_model
from strongreid.deploy.quantize import cosine_rows, export_int8
from strongreid.deploy.runtimes import run_onnx, run_openvino
from strongreid.evaluation import evaluate_features


def throughput(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int, iters: int) -> float:
    """Images/s of `run` on batches of `batch` taken from `x` (two warm-up calls first)."""
    xb = x[:batch]
    for _ in range(2):
        run(xb)
    start = time.perf_counter()
    for _ in range(iters):
        run(xb)
    return batch * iters / (time.perf_counter() - start)


def features(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Features of all of `x`, in batches."""
    return np.concatenate([run(x[i:i + batch]) for i in range(0, len(x), batch)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the run's config.yaml")
    p.add_argument("--weights", required=True, help="checkpoint (best.pt / last.pt)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--iters", type=int, default=20, help="timed calls per batch size")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best kept)")
    p.add_argument("--out", help="also write the report as JSON here")
    p.add_argument("opts", nargs="*", help="KEY VALUE config overrides, e.g. DATASETS.ROOT_DIR data")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [*args.opts, "TEST.WEIGHT", args.weights, "MODEL.DEVICE", "cpu",
                                    "MODEL.AMP", "off", "MODEL.CHANNELS_LAST", "off"])
    splits = load_splits(cfg, need_train=True)
    fe = FeatureExtractor(config=cfg, weights=args.weights, device="cpu")
    records = splits.query + splits.gallery
    x = fe.preprocess([r.path for r in records]).numpy()
    pids = np.array([r.pid for r in records])
    cams = np.array([r.camid for r in records])
    nq = len(splits.query)
    calib_dir = Path(tempfile.mkdtemp(prefix="calib_"))
    (calib_dir / "list.txt").write_text("\n".join(str(Path(r.path).resolve()) for r in splits.train))

    eager, _ = build_inference_model(cfg, args.weights)

    def run_eager(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return eager(torch.from_numpy(batch)).numpy()

    runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {"pytorch eager fp32": run_eager}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        export_model(cfg, "onnx", fp32, weights=args.weights)
        runners["onnxruntime fp32"] = run_onnx(fp32, args.threads)
        int8, report = export_int8(cfg, Path(tmp) / "model_int8.onnx", calib_dir / "list.txt",
                                   weights=args.weights)
        runners["onnxruntime int8"] = run_onnx(int8, args.threads)
        notes["onnxruntime int8"] = f"calibration cosine {report['mean_cosine']:.5f} on {report['images']} images"
        try:
            xml = Path(tmp) / "model.xml"
            export_model(cfg, "openvino", xml, weights=args.weights)
            runners["openvino fp32"] = run_openvino(xml, args.threads)
        except Exception as exc:  # noqa: BLE001 - a missing optional runtime is reported, not fatal
            notes["openvino fp32"] = f"skipped: {exc}"

        ref = features(run_eager, x)
        # Rounds over all runtimes, best of each: a busy machine slows whoever runs at the time,
        # and interleaving spreads that over all of them.
        speed: dict[str, dict[int, float]] = {name: {1: 0.0, 32: 0.0} for name in runners}
        for _ in range(args.rounds):
            for name, run in runners.items():
                for b in (1, 32):
                    speed[name][b] = max(speed[name][b], throughput(run, x, b, args.iters))
        rows = []
        base = {}
        for name, run in runners.items():
            f = features(run, x)
            cos = cosine_rows(ref, f)
            res = evaluate_features(torch.from_numpy(f[:nq]), torch.from_numpy(f[nq:]), pids[:nq],
                                    pids[nq:], cams[:nq], cams[nq:])
            ips = speed[name]
            row = {"runtime": name, "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                   "mAP": float(res.mAP), "rank1": float(res.cmc[0]),
                   "ips_b1": ips[1], "ips_b32": ips[32]}
            if not base:
                base = row
            row.update({"dmAP": row["mAP"] - base["mAP"], "x_b1": ips[1] / base["ips_b1"],
                        "x_b32": ips[32] / base["ips_b32"], "note": notes.get(name, "")})
            rows.append(row)

    print(f"{cfg.MODEL.NAME} at {list(cfg.INPUT.SIZE_TEST)}, {nq} query + {len(x) - nq} gallery, "
          f"{args.threads} threads, best of {args.rounds} rounds of {args.iters} calls a batch size")
    print("| runtime | cosine mean / min | mAP (change) | R1 | img/s b1 (x eager) | img/s b32 (x eager) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['runtime']} | {r['mean_cosine']:.5f} / {r['min_cosine']:.5f} | "
              f"{100 * r['mAP']:.2f} ({100 * r['dmAP']:+.2f}) | {100 * r['rank1']:.1f} | "
              f"{r['ips_b1']:.1f} ({r['x_b1']:.2f}x) | {r['ips_b32']:.1f} ({r['x_b32']:.2f}x) |")
    for name, note in notes.items():
        if name not in runners:
            print(f"{name}: {note}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "notes": notes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
