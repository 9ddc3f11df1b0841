"""Test-time precision: fp32 features vs autocast (bf16 on a CPU with AMX / AVX512-BF16).

Extracts the test split's features twice with `FeatureExtractor`, once with TEST.PRECISION fp32
(the default) and once with TEST.PRECISION amp (MODEL.AMP's autocast), and reports for each the
mAP / rank-1 / mINP, the cosine of the amp features to the fp32 ones, and images/s with the ratio
amp / fp32, timed in interleaved rounds in this process (best round kept; the ratio compares
across machines, the absolute figures do not).

    python benchmarks/feature_precision.py --config runs/demo/config.yaml --weights runs/demo/best.pt
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from strongreid.config import load_config
from strongreid.data.splits import load_splits
from strongreid.deploy import FeatureExtractor
from strongreid.evaluation import evaluate_from_config


def extract(fe: FeatureExtractor, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Features of the preprocessed batch `x` in TEST.IMS_PER_BATCH chunks, and the seconds taken."""
    start = time.perf_counter()
    out = torch.cat([fe.features(x[i:i + fe.batch_size]) for i in range(0, len(x), fe.batch_size)])
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the run's config.yaml")
    p.add_argument("--weights", required=True, help="checkpoint (best.pt / last.pt)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best kept)")
    p.add_argument("--out", help="also write the report as JSON here")
    p.add_argument("opts", nargs="*", help="KEY VALUE config overrides, e.g. DATASETS.ROOT_DIR data")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    base = [*args.opts, "TEST.WEIGHT", args.weights, "MODEL.DEVICE", "cpu"]
    cfgs = {name: load_config(args.config, [*base, "TEST.PRECISION", name]) for name in ("fp32", "amp")}
    splits = load_splits(cfgs["fp32"], need_train=False)
    extractors = {name: FeatureExtractor(config=cfg, weights=args.weights, device="cpu")
                  for name, cfg in cfgs.items()}
    records = splits.query + splits.gallery
    x = extractors["fp32"].preprocess([r.path for r in records])
    pids = np.array([r.pid for r in records])
    cams = np.array([r.camid for r in records])
    nq = len(splits.query)

    feats: dict[str, torch.Tensor] = {}
    best: dict[str, float] = {name: float("inf") for name in extractors}
    for _ in range(args.rounds):
        for name, fe in extractors.items():
            feats[name], seconds = extract(fe, x)
            best[name] = min(best[name], seconds)

    report: dict[str, object] = {
        "images": len(records), "threads": args.threads,
        "amp_dtype": str(extractors["amp"].amp_dtype).replace("torch.", ""),
        "flip": extractors["fp32"].flip, "input_size": list(extractors["fp32"].input_size),
    }
    for name in extractors:
        res = evaluate_from_config(cfgs[name], feats[name][:nq], feats[name][nq:], pids[:nq], pids[nq:],
                                   cams[:nq], cams[nq:])["plain"]
        report[name] = {"mAP": 100 * res.mAP, "rank1": 100 * float(res.cmc[0]), "mINP": 100 * res.mINP,
                        "images_per_s": len(records) / best[name]}
    cos = torch.nn.functional.cosine_similarity(feats["amp"], feats["fp32"], dim=1)
    report["cosine_amp_to_fp32"] = {"mean": float(cos.mean()), "min": float(cos.min())}
    report["speed_ratio_amp_over_fp32"] = best["fp32"] / best["amp"]
    report["mAP_change_amp_minus_fp32"] = report["amp"]["mAP"] - report["fp32"]["mAP"]

    print(f"{len(records)} images at {report['input_size']}, flip {report['flip']}, "
          f"{args.threads} threads, amp = {report['amp_dtype']}")
    print("| precision | mAP | R1 | mINP | img/s |")
    print("|---|---|---|---|---|")
    for name in extractors:
        r = report[name]
        print(f"| {name} | {r['mAP']:.2f} | {r['rank1']:.2f} | {r['mINP']:.2f} | {r['images_per_s']:.1f} |")
    print(f"cosine amp to fp32: mean {report['cosine_amp_to_fp32']['mean']:.6f}, "
          f"min {report['cosine_amp_to_fp32']['min']:.6f}; mAP change {report['mAP_change_amp_minus_fp32']:+.2f}; "
          f"speed amp / fp32 = {report['speed_ratio_amp_over_fp32']:.2f}x")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
