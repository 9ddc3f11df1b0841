"""How far the precision `strongreid calibrate` promises is from the one held-out people give.

`strongreid calibrate --holdout 0.5 --seed S` calibrates on half of the identities and measures
on the other half. One seed is one draw; this repeats the draw for many seeds on features
extracted once, for both threshold rules ("logistic", the default, and "counts"), and prints
per rule the share of splits measured within --tolerance of the request, the mean and spread
of the error, the mean recall, the genuine pairs behind each figure, and the splits with no
threshold. It also prints the floor no rule can beat: the held-out precision at one threshold
fixed in advance (the median of the logistic thresholds) varies from split to split as much as
the people drawn differ (a few look-alike people make most of the high-scoring impostors).

    PYTHONPATH=src python benchmarks/calibration_splits.py --model runs/demo/best.pt \\
        --data data/synthetic --dataset synthetic --split test --seeds 40

With `--measure-on`, the calibration is made once on all of --data (its rule's threshold for
--precision) and measured on new people instead of a held-out half: the identities of the
--measure-on folder above `--skip-ids` (for `strongreid synth --ids 1440 --seed 0`, whose
people 1-360 are the demo's own and whose cameras are the demo's). It prints the precision
expected in a gallery of as many people as the calibration has, drawn at random from the new
ones (their impostor pairs weighted by the chance that two people share such a gallery), the
galleries of one random cut for their spread, and then the same expectation for calibrations
made on each gallery of --draws cuts in turn, measured on all the other new people.

    PYTHONPATH=src python -m strongreid synth --out /tmp/street_1440 --ids 1440 --seed 0
    PYTHONPATH=src python benchmarks/calibration_splits.py --model runs/demo/best.pt \\
        --data data/synthetic --dataset synthetic --split test \\
        --measure-on /tmp/street_1440 --skip-ids 360
"""

from __future__ import annotations

import argparse

import numpy as np

from strongreid.adapt.calibrate import labelled, own_cameras, read_images, split_identities
from strongreid.deploy.extractor import FeatureExtractor
from strongreid.errors import StrongReIDError
from strongreid.evaluation.calibration import RULES, Calibration, pair_histograms, score_bins


def _counts(feats, pids, cams, queries, keep):
    q = keep & queries
    return pair_histograms(feats[q], feats[keep], pids[q], pids[keep], cams[q], cams[keep])


def _lookalikes(feats, pids, queries, k: int, bins: int, top: int = 8) -> None:
    """How many of the impostor pairs scoring in bin k or above the `top` pairs of people make."""
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    found: dict[tuple[int, int], int] = {}
    for i in np.flatnonzero(queries):
        hit = (score_bins(f @ f[i], bins) >= k) & (pids != pids[i])
        for j in np.flatnonzero(hit):
            key = (min(pids[i], pids[j]), max(pids[i], pids[j]))
            found[key] = found.get(key, 0) + 1
    counts = sorted(found.values(), reverse=True)
    print(f"look-alikes: of the {sum(counts)} impostor pairs of the whole set at or above "
          f"{-1.0 + 2.0 * k / bins:.4f}, {sum(counts[:top])} come from {top} of the {len(counts)} "
          "pairs of people that have any")


def _accepted(cal: Calibration, precision: float, counts: list) -> list[tuple[int, int, int]]:
    """(genuine accepted, impostor accepted, genuine in all) of each set of pairs at the
    calibration's threshold for `precision`, counted as they are."""
    k = cal._operating_bin(precision)[0]
    return [(int(hg[k:].sum()), int(hi[k:].sum()), int(hg.sum())) for hg, hi in counts]


def _expected(cal: Calibration, precision: float, counts: tuple, people: int,
              among: int) -> tuple[float, float]:
    """Precision and recall at the calibration's threshold for `precision` expected in a
    gallery of `people` drawn at random from the `among` people whose pairs `counts` holds: a
    pair of two people shares such a gallery with probability (people - 1) / (among - 1), as
    Calibration.for_people weighs impostor pairs; a person's own pairs always do."""
    k = cal._operating_bin(precision)[0]
    seen = Calibration.from_counts(*counts, {"people": among}, rule="counts").for_people(people)
    return float(seen.counted_precision()[k]), float(counts[0][k:].sum() / counts[0].sum())


def new_people(args, feats, pids, cams, queries, extractor) -> int:
    """Calibrated on all of --data; measured on new people, in galleries of the same size."""
    images = labelled(read_images(args.measure_on, args.measure_dataset, args.measure_split),
                      "--measure-on")
    # Distractors are nobody: left out of a test of people.
    images = images.subset(images.queries & (images.pids > args.skip_ids))
    people = int(np.unique(pids[queries]).size)
    new = np.unique(images.pids)
    if new.size < 2 * people:
        raise StrongReIDError(f"--measure-on holds {new.size} new people: fewer than two "
                              f"galleries of {people}")
    m_feats = extractor(images.paths).numpy()
    m_pids, m_cams, m_all = images.pids, own_cameras(images.camids), np.ones(len(images), bool)

    def counts_of(who: np.ndarray) -> tuple:
        return _counts(m_feats, m_pids, m_cams, m_all, np.isin(m_pids, who))

    everyone = counts_of(new)
    genuine, impostor = _counts(feats, pids, cams, queries, np.ones(len(pids), bool))
    print(f"calibrated on {people} people of {args.data} ({int(genuine.sum())} genuine pairs); "
          f"measured on {new.size} new people of {args.measure_on} (identities above "
          f"{args.skip_ids}, {len(images)} images) in galleries of {people}")
    groups = np.random.default_rng(args.group_seed).permutation(new)
    groups = [counts_of(groups[i:i + people]) for i in range(0, new.size - people + 1, people)]
    for rule in RULES:
        cal = Calibration.from_counts(genuine, impostor, {"people": people}, rule=rule)
        point = cal.operating_point(args.precision)
        measured, recall = _expected(cal, args.precision, everyone, people, new.size)
        one = [g / (g + i) for g, i, _ in _accepted(cal, args.precision, groups)]
        print(f"{rule:8s}: threshold {point['threshold']:.4f}; expected in a gallery of {people} "
              f"new people: precision {measured:.4f}, recall {recall:.3f}; the {len(groups)} "
              f"galleries of one draw (--group-seed {args.group_seed}): "
              f"{', '.join(f'{m:.4f}' for m in one)}")
    # Other draws of the calibration's people: each gallery of each of --draws partitions of the
    # new people calibrates in turn, measured on all the others as above (pairs counted once
    # for both rules).
    errors: dict[str, list[float]] = {rule: [] for rule in RULES}
    for draw in range(args.draws):
        order = np.random.default_rng(args.group_seed + draw).permutation(new)
        for c in range(new.size // people):
            mine = order[c * people:(c + 1) * people]
            rest = np.setdiff1d(new, mine)
            own, others = counts_of(mine), counts_of(rest)
            for rule in RULES:
                cal = Calibration.from_counts(*own, {"people": people}, rule=rule)
                try:
                    measured = _expected(cal, args.precision, others, people, rest.size)[0]
                except StrongReIDError:
                    measured = float("nan")
                errors[rule].append(measured - args.precision)
    for rule in RULES:
        err = np.array(errors[rule])
        ok = ~np.isnan(err)
        print(f"{rule:8s}, calibrated on each of {err.size} galleries of {people} new people in turn "
              f"({args.draws} partitions), measured on the others: within ±{args.tolerance:g} in "
              f"{int(np.sum(np.abs(err[ok]) <= args.tolerance))}/{err.size}, error mean "
              f"{err[ok].mean():+.4f}, sd {err[ok].std():.4f}, range {err[ok].min():+.4f} to "
              f"{err[ok].max():+.4f}; no threshold on {int((~ok).sum())}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--split", default="test")
    ap.add_argument("--holdout", type=float, default=0.5)
    ap.add_argument("--precision", type=float, default=0.95)
    ap.add_argument("--tolerance", type=float, default=0.03)
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-retarget", dest="retarget", action="store_false",
                    help="keep each threshold at the calibration half's own number of people")
    ap.add_argument("--measure-on", default=None,
                    help="measure on new people of this folder instead of held-out halves")
    ap.add_argument("--measure-dataset", default=None)
    ap.add_argument("--measure-split", default="test")
    ap.add_argument("--skip-ids", type=int, default=0,
                    help="--measure-on identities up to this one are not new (left out)")
    ap.add_argument("--group-seed", type=int, default=0, help="draws the galleries of new people")
    ap.add_argument("--draws", type=int, default=3,
                    help="partitions of the new people whose galleries calibrate in turn")
    args = ap.parse_args()

    images = labelled(read_images(args.data, args.dataset, args.split), "--data")
    extractor = FeatureExtractor(None, args.model, device=args.device, calibration=False)
    feats = extractor(images.paths).numpy()
    pids, cams, queries = images.pids, own_cameras(images.camids), images.queries
    if args.measure_on:
        return new_people(args, feats, pids, cams, queries, extractor)
    print(f"{len(images)} images of {np.unique(pids).size} identities ({(~queries).sum()} "
          f"distractors, gallery only); holdout {args.holdout:g}, requested {args.precision:g}")

    rows: dict[str, list[tuple[float, float, int, int]]] = {rule: [] for rule in RULES}
    thresholds, held_counts, cal_at = [], [], []
    for seed in range(args.seeds):
        held = split_identities(pids, args.holdout, seed)
        genuine, impostor = _counts(feats, pids, cams, queries, ~held)
        held_counts.append(_counts(feats, pids, cams, queries, held))
        cal_at.append(lambda k, g=genuine, i=impostor: g[k:].sum() / (g[k:].sum() + i[k:].sum()))
        hg = np.cumsum(held_counts[-1][0][::-1])[::-1]
        hi = np.cumsum(held_counts[-1][1][::-1])[::-1]
        # As `strongreid calibrate` measures: the calibration re-targeted to the held-out
        # people (a split by identity puts distractors, each an identity, on either side, so
        # the halves hold different numbers of people).
        people = (int(np.unique(pids[~held & queries]).size), int(np.unique(pids[held & queries]).size))
        for rule in RULES:
            cal = Calibration.from_counts(genuine, impostor, {"people": people[0]}, rule=rule)
            cal = cal.for_people(people[1] if args.retarget else None)
            try:
                k = cal._operating_bin(args.precision)[0]
            except StrongReIDError:
                rows[rule].append((float("nan"), 0.0, int(genuine.sum()), 0))
                continue
            if rule == "logistic":
                thresholds.append(k)
            measured = hg[k] / (hg[k] + hi[k]) if hg[k] + hi[k] else float("nan")
            rows[rule].append((measured, hg[k] / hg[0], int(genuine.sum()), int(hg[k])))
            if seed < 3:
                print(f"seed {seed} {rule:8s}: people {people[0]} / {people[1]}, threshold "
                      f"{cal._edge(k):.4f}, measured {measured:.4f}, "
                      f"recall {hg[k] / hg[0]:.3f}; genuine pairs: {int(genuine.sum())} calibrating, "
                      f"{int(hg[0])} held out, {int(hg[k])} held-out ones accepted")
    for rule, r in rows.items():
        a = np.array(r, np.float64)
        err = a[:, 0] - args.precision
        found = ~np.isnan(err)
        print(f"{rule:8s}: within ±{args.tolerance:g} on {np.sum(np.abs(err[found]) <= args.tolerance)}"
              f"/{args.seeds} splits; error mean {err[found].mean():+.4f}, sd {err[found].std():.4f}; "
              f"mean recall {a[found, 1].mean():.3f}; no threshold on {int((~found).sum())}")
    if thresholds:
        k0 = int(np.median(thresholds))
        fixed = []
        for genuine, impostor in held_counts:
            g, i = genuine[k0:].sum(), impostor[k0:].sum()
            fixed.append(g / (g + i))
        fixed = np.array(fixed)
        centre = -1.0 + 2.0 * k0 / len(held_counts[0][0])
        _lookalikes(feats, pids, queries, k0, len(held_counts[0][0]))
        for seed in range(min(3, args.seeds)):
            print(f"seed {seed}: at {centre:.4f} the calibration half's counted precision is "
                  f"{cal_at[seed](k0):.4f}, the held-out half's {fixed[seed]:.4f}")
        print(f"floor: at one fixed threshold ({centre:.4f}) the held-out precision is "
              f"{fixed.mean():.4f} ± {fixed.std():.4f} (sd) over the splits; within ±{args.tolerance:g} "
              f"of {args.precision:g} on {np.sum(np.abs(fixed - args.precision) <= args.tolerance)}"
              f"/{args.seeds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
