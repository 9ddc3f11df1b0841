"""Wall time of `configs/demo.yml` against the paper's recipe (`configs/demo_bot.yml`), one process.

Issue 14 asks that the new demo train in no more wall time than the old one. Sequential runs
of whole trainings on a shared 2-core machine drift by 10 % and more, more than the difference
to measure, so this benchmark builds both trainers in one process and alternates them: an
epoch of one, an epoch of the other (AB, then BA in the next round, so neither always runs
first), then one evaluation each in the same order. It prints the median epoch and evaluation
times and projects each recipe's training time from its own counts: MAX_EPOCHS epochs plus its
evaluations (every EVAL_PERIOD epochs and after the last one); `make demo` adds one more
evaluation (its `strongreid test` step). Both come as ratios new / old.

    python benchmarks/demo_walltime.py                 # 3 rounds (about 5 minutes on 2 cores)
    python benchmarks/demo_walltime.py --rounds 1 --json runs/demo_walltime.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from strongreid.config import load_config  # noqa: E402
from strongreid.engine.runtime import setup_logging  # noqa: E402
from strongreid.engine.trainer import Trainer, evaluates_after  # noqa: E402
from strongreid.evaluation.hooks import EvalHook  # noqa: E402

RECIPES = {"paper (demo_bot.yml)": ROOT / "configs" / "demo_bot.yml", "demo (demo.yml)": ROOT / "configs" / "demo.yml"}


def evaluations(cfg) -> int:
    """How many evaluations `strongreid train` runs with this config."""
    return sum(evaluates_after(cfg, e) for e in range(1, cfg.SOLVER.MAX_EPOCHS + 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="epochs (and evaluations) of each recipe")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("opts", nargs="*", help="KEY VALUE overrides for both recipes")
    args = p.parse_args(argv)
    if len(args.opts) % 2:
        raise SystemExit(f"overrides come in KEY VALUE pairs; got {args.opts}")

    with tempfile.TemporaryDirectory(prefix="demo_walltime_") as tmp:  # the runs' files go with it
        try:
            return _measure(args, Path(tmp))
        finally:
            # The runs' log.txt is deleted with the folder: the process (a test session, say)
            # keeps logging to the console only, never to a file that no longer exists.
            setup_logging(None)


def _measure(args: argparse.Namespace, tmp: Path) -> int:
    trainers, evals, cfgs = {}, {}, {}
    for i, (name, path) in enumerate(RECIPES.items()):
        cfgs[name] = load_config(str(path), [*args.opts, "OUTPUT_DIR", str(tmp / f"run{i}")])
        evals[name] = EvalHook()
        trainers[name] = Trainer(cfgs[name], hooks=[evals[name]])
    names = list(RECIPES)
    epoch_s: dict[str, list[float]] = {n: [] for n in names}
    eval_s: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t = time.perf_counter()
            trainers[name].train_one_epoch(r + 1)
            epoch_s[name].append(time.perf_counter() - t)
        for name in order:
            t = time.perf_counter()
            evals[name].evaluate(r + 1)
            eval_s[name].append(time.perf_counter() - t)

    out = {}
    for name in names:
        cfg = cfgs[name]
        ep, ev = statistics.median(epoch_s[name]), statistics.median(eval_s[name])
        n_eval = evaluations(cfg)
        out[name] = {"epoch_s": epoch_s[name], "eval_s": eval_s[name], "median_epoch_s": ep,
                     "median_eval_s": ev, "epochs": cfg.SOLVER.MAX_EPOCHS, "evaluations": n_eval,
                     "projected_train_s": cfg.SOLVER.MAX_EPOCHS * ep + n_eval * ev,
                     # `make demo` then runs `strongreid test` on best.pt: one evaluation more
                     "projected_make_demo_s": cfg.SOLVER.MAX_EPOCHS * ep + (n_eval + 1) * ev}
    old, new = (out[n]["projected_train_s"] for n in names)
    print("| recipe | median epoch s | median eval s | epochs + evals | projected train s | with the test step s |")
    print("|---|---|---|---|---|---|")
    for name in names:
        o = out[name]
        print(f"| {name} | {o['median_epoch_s']:.1f} | {o['median_eval_s']:.1f} | "
              f"{o['epochs']} + {o['evaluations']} | {o['projected_train_s']:.0f} | "
              f"{o['projected_make_demo_s']:.0f} |")
    e_old, e_new = (out[n]["median_epoch_s"] for n in names)
    d_old, d_new = (out[n]["projected_make_demo_s"] for n in names)
    print(f"demo / paper: epoch {e_new / e_old:.3f}, projected training {new / old:.3f}, "
          f"with the test step {d_new / d_old:.3f} ({args.rounds} rounds)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"recipes": out, "ratio_train": new / old,
                                               "ratio_make_demo": d_new / d_old,
                                               "ratio_epoch": e_new / e_old, "rounds": args.rounds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
