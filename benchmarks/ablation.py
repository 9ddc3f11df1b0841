"""Ablation of fast-reid's BoT differences on the demo setting (docs/ablation.md).

Each variant trains `configs/demo.yml` (ResNet-18 from scratch at 64x32, 16 epochs, on the
synthetic set) with a few config overrides, for N seeds, one training after another, and the
table gives the mean and spread of mAP and rank-1 so that a difference can be told from seed
noise. Every variant starts from BOT, the paper's recipe restated key by key (center loss,
warm-up stepped per epoch, classifier std 0.001, erasing fill of the original), so the table
does not move when configs/demo.yml itself changes; `demo` is configs/demo.yml as it stands.

Results are appended to a JSON file after every training (default runs/ablation/results.json);
a rerun skips the (variant, seed) pairs already there and resumes a training that was stopped
half-way from its last.pt, so an interrupted ablation continues where it stopped.

    python benchmarks/ablation.py                                   # every variant, 3 seeds
    python benchmarks/ablation.py --variants bot no_center --seeds 2
    python benchmarks/ablation.py --table                           # print the table only
    python benchmarks/ablation.py --list                            # variants and overrides
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The paper's recipe (reid-strong-baseline) in terms of every key the ablation touches.
BOT: list[str] = [
    "MODEL.METRIC_LOSS_TYPE", "triplet_center",
    "MODEL.IF_WITH_CENTER", "yes",
    "SOLVER.LR_STEP_UNIT", "epoch",
    "MODEL.CLASSIFIER_INIT_STD", "0.001",
    "MODEL.ZERO_INIT_RESIDUAL", "False",
    "INPUT.RE_FILL", "original",
    "INPUT.RE_SH", "0.4",
    "TEST.NECK_FEAT", "after",
    "INPUT.INTERPOLATION", "bilinear",
    "MODEL.HEAD_PRECISION", "amp",
    "TEST.FLIP_AUG", "False",
    "SOLVER.EVAL_PERIOD", "8",  # the old demo's evaluations at epochs 8 and 16 (demo.yml: 16 only)
]

NO_CENTER = ["MODEL.METRIC_LOSS_TYPE", "triplet", "MODEL.IF_WITH_CENTER", "no"]
WARMUP_ITER = ["SOLVER.LR_STEP_UNIT", "warmup"]
SCHED_ITER = ["SOLVER.LR_STEP_UNIT", "iter"]  # warm-up and decay both stepped per iteration
BICUBIC = ["INPUT.INTERPOLATION", "bicubic"]
FLIP_TEST = ["TEST.FLIP_AUG", "True"]  # test on the mean of the image's and its mirror's features
HEAD_FP32 = ["MODEL.HEAD_PRECISION", "fp32"]  # pooling, BNNeck and classifier outside bf16
CLS_STD = ["MODEL.CLASSIFIER_INIT_STD", "0.01"]
RE_FASTREID = ["INPUT.RE_FILL", "zero", "INPUT.RE_SH", "0.33"]
# fast-reid's Base-bagtricks as far as it differs from the paper in what matters from scratch.
FASTREID = NO_CENTER + WARMUP_ITER + CLS_STD + RE_FASTREID

# name -> overrides applied on top of BOT (None: configs/demo.yml unchanged).
VARIANTS: dict[str, list[str] | None] = {
    "bot": [],
    "no_center": NO_CENTER,
    "warmup_iter": WARMUP_ITER,
    "sched_iter": SCHED_ITER,
    "cls_std_0.01": CLS_STD,
    "zero_init_residual": ["MODEL.ZERO_INIT_RESIDUAL", "True"],
    "re_fill_zero": RE_FASTREID,
    "test_before_bn": ["TEST.NECK_FEAT", "before"],
    "bicubic": BICUBIC,
    "fastreid": FASTREID,
    "fastreid+zero_init": FASTREID + ["MODEL.ZERO_INIT_RESIDUAL", "True"],
    "no_center+warmup_iter": NO_CENTER + WARMUP_ITER,
    "fastreid+bicubic": FASTREID + BICUBIC,
    "fastreid+bicubic+sched_iter": FASTREID + BICUBIC + SCHED_ITER,
    "fastreid+bicubic+flip_test": FASTREID + BICUBIC + FLIP_TEST,
    "head_fp32": HEAD_FP32,
    "fastreid+head_fp32": FASTREID + HEAD_FP32,
    "fastreid+bicubic+head_fp32": FASTREID + BICUBIC + HEAD_FP32,
    "demo": None,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="variants to train, in this order (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant: SOLVER.SEED 0..N-1")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yml"))
    p.add_argument("--out", default=str(ROOT / "runs" / "ablation"), help="run folders go here")
    p.add_argument("--json", default=None, help="results file (default OUT/results.json)")
    p.add_argument("--table", action="store_true", help="print the table from the JSON and exit")
    p.add_argument("--list", action="store_true", help="print the variants' overrides and exit")
    p.add_argument("opts", nargs="*", help="KEY VALUE overrides for every variant (after the variant's)")
    return p.parse_args(argv)


def overrides(name: str) -> list[str]:
    """The KEY VALUE list a variant trains with (on top of the config file)."""
    extra = VARIANTS[name]
    return [] if extra is None else BOT + extra


def _recipe_hash(config: str, opts: list[str]) -> str:
    """A hash of the merged config less its seed and output folder (the same recipe otherwise)."""
    sys.path.insert(0, str(ROOT / "src"))
    from strongreid.config import load_config
    from strongreid.config.loader import dump_config

    cfg = load_config(config, [*opts, "SOLVER.SEED", "0", "OUTPUT_DIR", "-"])
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16]


def recipe_id(config: str, name: str, opts: list[str]) -> str:
    """The recipe a variant trains: a result is reused only for the same recipe, so editing
    configs/demo.yml reruns `demo` but not `bot`."""
    return _recipe_hash(config, [*overrides(name), *opts])


def run_recipe_id(run_dir: Path) -> str:
    """recipe_id of what a training actually ran, from the config.yaml it saved (an edit of the
    config file while it trains does not relabel it)."""
    return _recipe_hash(str(run_dir / "config.yaml"), [])


def load_results(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def save_results(path: Path, rows: list[dict]) -> None:
    """Atomic rewrite: an interrupted ablation keeps every finished training."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    os.replace(tmp, path)


def train_once(config: str, name: str, seed: int, out: Path, opts: list[str]) -> dict:
    """One `strongreid train` in a subprocess (a fresh process per run: nothing leaks between
    variants); returns its final metrics and wall time."""
    run_dir = out / name / f"seed{seed}"
    # An interrupted training of this pair continues from its last.pt: `strongreid train
    # --resume` gives the same model as an uninterrupted run (tests/test_train.py), so a long
    # ablation survives being stopped. Its wall time then covers only the resumed part.
    resumed = (run_dir / "last.pt").is_file()
    cmd = [sys.executable, "-m", "strongreid", "train", *(["--resume"] if resumed else []),
           "--config", config, *overrides(name), "SOLVER.SEED", str(seed), "OUTPUT_DIR", str(run_dir), *opts]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"variant {name} seed {seed} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    res = json.loads((run_dir / "results.json").read_text())
    return {"variant": name, "seed": seed, "mAP": res["mAP"], "rank1": res["rank1"],
            "mINP": res.get("mINP"), "wall_s": wall, "train_time_s": res.get("train_time_s"),
            "overrides": overrides(name) + opts, "config": config, "resumed": resumed,
            "recipe": run_recipe_id(run_dir)}


def _mean_spread(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def table(rows: list[dict], recipes: dict[str, str] | None = None) -> str:
    """Mean +- sample std (and min..max) of mAP and rank-1 in percent, per variant. With
    `recipes` (variant -> recipe id) a variant's rows are those of its recipe, whichever variant
    name trained them (`demo` shares the rows of the variant it equals); without, by name."""
    order = list(dict.fromkeys([*VARIANTS, *(r["variant"] for r in rows)]))
    if recipes is not None:
        order = [n for n in order if n in recipes]
    lines = ["| variant | seeds | mAP % | rank-1 % | mAP min..max | train s/run |",
             "|---|---|---|---|---|---|"]
    for name in order:
        if recipes is None:
            got = [r for r in rows if r["variant"] == name]
        else:
            got = list({r["seed"]: r for r in rows if r.get("recipe") == recipes[name]}.values())
        if not got:
            continue
        m, ms = _mean_spread([100 * r["mAP"] for r in got])
        r1, r1s = _mean_spread([100 * r["rank1"] for r in got])
        lo, hi = min(100 * r["mAP"] for r in got), max(100 * r["mAP"] for r in got)
        fresh = [r["wall_s"] for r in got if not r.get("resumed")]  # resumed: a part only
        wall = f"{statistics.fmean(fresh):.0f}" if fresh else "?"
        pm = lambda s: "" if math.isnan(s) else f" ± {s:.1f}"  # noqa: E731
        lines.append(f"| {name} | {len(got)} | {m:.1f}{pm(ms)} | {r1:.1f}{pm(r1s)} | "
                     f"{lo:.1f}..{hi:.1f} | {wall} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    path = Path(args.json) if args.json else out / "results.json"
    if args.list:
        for name in VARIANTS:
            print(f"{name}: {' '.join(overrides(name)) or '(configs/demo.yml as it is)'}")
        return 0
    if len(args.opts) % 2:
        raise SystemExit(f"overrides come in KEY VALUE pairs; got {args.opts}")
    rows = load_results(path)
    recipes = {name: recipe_id(args.config, name, args.opts) for name in VARIANTS}
    if args.table:
        stale = sum(r.get("recipe") not in recipes.values() for r in rows)
        print(table(rows, recipes))
        if stale:
            print(f"({stale} results of other recipes in {path} left out)")
        return 0
    for name in args.variants:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            # The same recipe and seed is the same training, whichever variant name ran it.
            if any(r["seed"] == seed and r.get("recipe") == recipes[name] for r in rows):
                continue
            print(f"training {name} seed {seed} ...", flush=True)
            row = train_once(args.config, name, seed, out, args.opts)
            # Re-read before appending: another ablation process may have added rows meanwhile.
            rows = [*load_results(path), row]
            save_results(path, rows)
            print(f"  mAP {100 * row['mAP']:.1f}  rank-1 {100 * row['rank1']:.1f}  "
                  f"{row['wall_s']:.0f} s", flush=True)
    print(table(rows, recipes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
