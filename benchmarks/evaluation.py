"""Evaluation engine benchmark: times and peak memory as ratios against references run here.

    python benchmarks/evaluation.py                       # Market-1501 scale
    python benchmarks/evaluation.py --scale both --rerank # + MSMT17 scale and re-ranking (minutes)

Every case runs in its own subprocess on synthetic 2048-d features clustered by identity (so
mAP is neither 0 nor 1). Peak memory is the process's VmHWM after the inputs were built
(/proc/self/clear_refs resets it), so it is what the case itself adds on top of its inputs.
The reference is the bare query x gallery float32 matmul at the same scale, timed in the same
run, so machine load affects both sides. Times are the best of --repeats.
Targets (issue #4): evaluate <= 0.17x the matmul, evaluate_features <= 1.2x; at MSMT17 scale
evaluate_features < 30 s and <= 2 GB above the features; re_ranking at Market scale <= 8 s and
<= 2 GB above the features, at MSMT17 scale within 16 GB and 15 minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

SCALES = {
    # name: (queries, gallery, identities, cameras, distractor share of the gallery)
    "market": (3368, 15913, 751, 6, 0.18),
    "msmt": (11659, 82161, 3060, 15, 0.0),
}
DIM = 2048
GIB = 1024**3


def make_features(scale: str, noise: float, seed: int = 0):
    """Identity centres plus noise; distractors (pid 0) are pure noise."""
    import torch

    num_q, num_g, ids, cams, distract = SCALES[scale]
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(ids + 1, DIM, generator=gen)
    g_pids = torch.randint(1, ids + 1, (num_g,), generator=gen)
    q_pids = torch.randint(1, ids + 1, (num_q,), generator=gen)
    n_distract = int(num_g * distract)
    g_pids[:n_distract] = 0
    g_cams = torch.randint(0, cams, (num_g,), generator=gen)
    q_cams = torch.randint(0, cams, (num_q,), generator=gen)
    g = centers[g_pids]
    g.add_(torch.randn(num_g, DIM, generator=gen), alpha=noise)
    g[:n_distract] = torch.randn(n_distract, DIM, generator=gen) * (1 + noise * noise) ** 0.5
    q = centers[q_pids]
    q.add_(torch.randn(num_q, DIM, generator=gen), alpha=noise)
    labels = (q_pids.numpy(), g_pids.numpy(), q_cams.numpy(), g_cams.numpy())
    return q, g, labels


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> int:
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return _status("VmRSS")


def _once(fn):
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_case(case: str, scale: str, repeats: int, noise: float) -> dict:
    """Peak memory from a first run, then `repeats` timings interleaved with the reference."""
    import torch

    from strongreid.evaluation import (
        evaluate,
        evaluate_features,
        l2_normalize,
        pairwise_distance,
        re_ranking,
    )

    q, g, labels = make_features(scale, noise)
    result: dict = {"case": case, "scale": scale, "threads": torch.get_num_threads(),
                    "features_gib": (q.numel() + g.numel()) * 4 / GIB}
    if case == "check":
        # Same numbers as the textbook per-query evaluator (numpy full sort), on 300 queries.
        import numpy as np

        dist = pairwise_distance(q[:300], g).numpy()
        q_pids, g_pids, q_cams, g_cams = labels
        res = evaluate(dist, q_pids[:300], g_pids, q_cams[:300], g_cams)
        diffs = []
        for i in range(300):
            order = np.argsort(dist[i], kind="stable")
            keep = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
            ranks = np.nonzero(g_pids[order][keep] == q_pids[i])[0] + 1
            ap = np.mean(np.arange(1, len(ranks) + 1) / ranks)
            diffs.append(abs(ap - res.ap[i]))
        result["max_ap_diff"] = float(max(diffs))
        return result
    if case == "evaluate":
        dist = pairwise_distance(q, g)
        work = lambda: evaluate(dist, *labels)  # noqa: E731
    elif case == "evaluate_features":
        work = lambda: evaluate_features(q, g, *labels)  # noqa: E731
    elif case == "rerank":
        qn, gn = l2_normalize(q), l2_normalize(g)
        work = lambda: re_ranking(qn, gn)  # noqa: E731
    else:
        raise SystemExit(f"unknown case {case}")
    base = _reset_peak()
    first, out = _once(work)
    result["peak_above_inputs_gib"] = (_status("VmHWM") - base) / GIB
    res = out if case != "rerank" else evaluate(out, *labels)
    result.update(mAP=res.mAP, mINP=res.mINP, rank1=res.rank(1))
    del out, res
    times, refs = [first], []
    for i in range(repeats):
        refs.append(_once(lambda: torch.mm(q, g.t()))[0])
        if i:
            times.append(_once(work)[0])
    result["time"], result["ref"] = min(times), min(refs)
    return result


def spawn(case: str, scale: str, repeats: int, noise: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--scale", scale,
           "--repeats", str(repeats), "--noise", str(noise)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": case, "scale": scale, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scale", choices=["market", "msmt", "both"], default="market")
    ap.add_argument("--rerank", action="store_true", help="also time re_ranking")
    ap.add_argument("--repeats", type=int, default=3, help="best of N (MSMT17 cases run once)")
    ap.add_argument("--noise", type=float, default=2.7, help="feature noise (higher = harder)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.scale, args.repeats, args.noise)))
        return
    scales = ["market", "msmt"] if args.scale == "both" else [args.scale]
    for scale in scales:
        reps = args.repeats if scale == "market" else 1
        cases = ["evaluate", "evaluate_features"] + (["check"] if scale == "market" else [])
        if args.rerank:
            cases.append("rerank")
        print(f"== {scale}: {SCALES[scale][0]} x {SCALES[scale][1]}, {DIM}-d, noise {args.noise}")
        for case in cases:
            r = spawn(case, scale, reps, args.noise)
            if "error" in r:
                print(f"  {case:<18} FAILED: {r['error']}")
            elif case == "check":
                print(f"  {case:<18} max |AP - per-query numpy AP| over 300 queries: "
                      f"{r['max_ap_diff']:.2e}")
            else:
                print(f"  {case:<18} {r['time']:7.2f} s = {r['time'] / r['ref']:6.3f} x matmul "
                      f"({r['ref']:.2f} s, same process)  peak +{r['peak_above_inputs_gib']:.2f} "
                      f"GiB over inputs ({r['features_gib']:.2f} GiB features)  "
                      f"mAP {r['mAP']:.3f} mINP {r['mINP']:.3f} R1 {r['rank1']:.3f}")


if __name__ == "__main__":
    main()
