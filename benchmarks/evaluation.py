"""Evaluation engine benchmark: times and peak memory as ratios against references run here.

    python benchmarks/evaluation.py                       # Market-1501 scale
    python benchmarks/evaluation.py --scale both --rerank # + MSMT17 scale and re-ranking (minutes)

Where CUDA is present, evaluate_features also runs on the GPU against a GPU matmul.
Every case runs in its own subprocess on synthetic 2048-d features clustered by identity (so
mAP is neither 0 nor 1). Peak memory is the process's VmHWM after the inputs were built
(/proc/self/clear_refs resets it), so it is what the case itself adds on top of its inputs.
The reference is the bare query x gallery float32 matmul at the same scale, timed in the same
run, interleaved with the case, so machine load affects both sides; times are the best of
--repeats. The ratio of process CPU seconds is printed too: other processes disturb it less,
but it counts both cores of the matmul and one of the evaluator's bookkeeping (which runs
single-threaded, see strongreid.evaluation.distance.serial_cpu).
Targets: evaluate <= 0.17x the matmul, evaluate_features <= 1.2x; at MSMT17 scale
evaluate_features < 30 s and <= 2 GB above the features; re_ranking at Market scale <= 8 s and
<= 2 GB above the features, at MSMT17 scale within 16 GB and 15 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
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
    """Reset VmHWM to the current RSS (Linux) and return that baseline."""
    gc.collect()
    # Hand freed heap pages back first, so the baseline is what is really held; both steps
    # are best effort (another libc, no /proc) and only make the figure less conservative.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status("VmRSS")


def _once(fn):
    """(wall seconds, CPU seconds of this process, result)."""
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def run_case(case: str, scale: str, repeats: int, noise: float, threads: int) -> dict:
    """Peak memory from a first run, then `repeats` timings interleaved with the reference."""
    import torch

    if threads:
        torch.set_num_threads(threads)

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
    cuda = case.endswith("_cuda")
    if cuda:  # GPU figures: both sides synchronised, peak from the CUDA allocator
        dev = torch.device("cuda", torch.cuda.current_device())
        q, g = q.to(dev), g.to(dev)
        torch.cuda.synchronize(dev)
    if case == "evaluate":
        dist = pairwise_distance(q, g)
        work = lambda: evaluate(dist, *labels)  # noqa: E731
    elif case in ("evaluate_features", "evaluate_features_cuda"):
        work = lambda: evaluate_features(q, g, *labels)  # noqa: E731
    elif case == "rerank":
        qn, gn = l2_normalize(q), l2_normalize(g)
        work = lambda: re_ranking(qn, gn)  # noqa: E731
    else:
        raise SystemExit(f"unknown case {case}")

    def ref() -> object:
        out = torch.mm(q, g.t())
        if cuda:
            torch.cuda.synchronize()
        return out

    base = _reset_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    first = _once(work)
    peak = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    result["peak_above_inputs_gib"] = (peak - base) / GIB
    res = first[2] if case != "rerank" else evaluate(first[2], *labels)
    result.update(mAP=res.mAP, mINP=res.mINP, rank1=res.rank(1))
    del res
    times, refs = [first[:2]], []
    first = None
    for i in range(repeats):
        refs.append(_once(ref)[:2])
        if i:
            times.append(_once(work)[:2])
    result["time"], result["ref"] = min(t[0] for t in times), min(t[0] for t in refs)
    result["cpu"], result["ref_cpu"] = min(t[1] for t in times), min(t[1] for t in refs)
    return result


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def spawn(case: str, scale: str, repeats: int, noise: float, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", case, "--scale", scale,
           "--repeats", str(repeats), "--noise", str(noise), "--threads", str(threads)]
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
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--only", nargs="+", default=None, metavar="CASE",
                    help="run only these cases (evaluate, evaluate_features, "
                    "evaluate_features_cuda, check, rerank)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.scale, args.repeats, args.noise, args.threads)))
        return
    scales = ["market", "msmt"] if args.scale == "both" else [args.scale]
    for scale in scales:
        reps = args.repeats if scale == "market" else 1
        cases = ["evaluate", "evaluate_features"] + (["check"] if scale == "market" else [])
        if args.rerank:
            cases.append("rerank")
        if _has_cuda():
            cases.append("evaluate_features_cuda")
        if args.only:
            cases = [c for c in ["evaluate", "evaluate_features", "evaluate_features_cuda", "check",
                                 "rerank"] if c in args.only]
        print(f"== {scale}: {SCALES[scale][0]} x {SCALES[scale][1]}, {DIM}-d, noise {args.noise}")
        for case in cases:
            r = spawn(case, scale, reps, args.noise, args.threads)
            if "error" in r:
                print(f"  {case:<18} FAILED: {r['error']}")
            elif case == "check":
                print(f"  {case:<18} max |AP - per-query numpy AP| over 300 queries: "
                      f"{r['max_ap_diff']:.2e}")
            else:
                print(f"  {case:<18} {r['time']:7.2f} s = {r['time'] / r['ref']:6.3f} x matmul "
                      f"({r['ref']:.2f} s; CPU-time ratio {r['cpu'] / r['ref_cpu']:.3f})  "
                      f"peak +{r['peak_above_inputs_gib']:.2f} GiB over inputs "
                      f"({r['features_gib']:.2f} GiB features)  "
                      f"mAP {r['mAP']:.3f} mINP {r['mINP']:.3f} R1 {r['rank1']:.3f}")


if __name__ == "__main__":
    main()
