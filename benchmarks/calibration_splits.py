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
people 1-360 are the demo's own and whose cameras are the demo's), cut into groups of as many
people as the calibration has, each group its own gallery. It prints every group's measured
precision and recall and the pooled one (all groups' pairs counted together): a held-out half
of 90 people is too few for a ±0.03 check at 0.95, since its look-alikes alone move it by
about that much.

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


def new_people(args, feats, pids, cams, queries, extractor) -> int:
    """Calibrated on all of --data; measured on groups of new people of the same size."""
    images = labelled(read_images(args.measure_on, args.measure_dataset, args.measure_split),
                      "--measure-on")
    # Distractors are nobody: left out of a test of people.
    images = images.subset(images.queries & (images.pids > args.skip_ids))
    m_feats = extractor(images.paths).numpy()
    m_pids, m_cams = images.pids, own_cameras(images.camids)
    every = np.ones(len(pids), bool)
    genuine, impostor = _counts(feats, pids, cams, queries, every)
    people = int(np.unique(pids[queries]).size)
    ids = np.random.default_rng(args.group_seed).permutation(np.unique(m_pids))
    groups = [ids[i:i + people] for i in range(0, ids.size - people + 1, people)]
    print(f"calibrated on {people} people of {args.data} ({int(genuine.sum())} genuine pairs); "
          f"measured on {len(groups)} groups of {people} new people of {args.measure_on} "
          f"(identities above {args.skip_ids}, {len(images)} images)")
    if not groups:
        raise StrongReIDError(f"--measure-on holds {ids.size} new people: fewer than one group "
                              f"of {people}")
    for rule in RULES:
        cal = Calibration.from_counts(genuine, impostor, {"people": people}, rule=rule)
        pooled_g = pooled_i = pooled_all = 0
        within, lines = 0, []
        for group in groups:
            mask = np.isin(m_pids, group)
            hg, hi = _counts(m_feats, m_pids, m_cams, np.ones(len(m_pids), bool), mask)
            at = cal.for_people(int(group.size))
            k = at._operating_bin(args.precision)[0]
            g, i = int(hg[k:].sum()), int(hi[k:].sum())
            measured = g / (g + i) if g + i else float("nan")
            within += abs(measured - args.precision) <= args.tolerance
            pooled_g, pooled_i, pooled_all = pooled_g + g, pooled_i + i, pooled_all + int(hg.sum())
            lines.append(f"{measured:.4f} (recall {g / hg.sum():.3f}, {g} genuine / {i} impostor "
                         f"pairs accepted)")
        print(f"{rule:8s}: threshold {cal._edge(k):.4f}, calibration's own fitted precision "
              f"{cal.operating_point(args.precision)['precision']:.4f}")
        for n, line in enumerate(lines):
            print(f"  group {n}: measured {line}")
        print(f"  within ±{args.tolerance:g} of {args.precision:g} in {within}/{len(groups)} groups; "
              f"pooled: measured {pooled_g / (pooled_g + pooled_i):.4f}, recall "
              f"{pooled_g / pooled_all:.3f} ({pooled_g} genuine / {pooled_i} impostor pairs)")
    # Each group of new people calibrates in turn and the others measure, pooled: how much the
    # draw of the calibration's own people moves the promise.
    counts = [_counts(m_feats, m_pids, m_cams, np.ones(len(m_pids), bool), np.isin(m_pids, g))
              for g in groups]
    for rule in RULES:
        pooled = []
        for c, (genuine, impostor) in enumerate(counts):
            cal = Calibration.from_counts(genuine, impostor, {"people": people}, rule=rule)
            k = cal._operating_bin(args.precision)[0]
            g = sum(int(hg[k:].sum()) for n, (hg, _) in enumerate(counts) if n != c)
            i = sum(int(hi[k:].sum()) for n, (_, hi) in enumerate(counts) if n != c)
            pooled.append(g / (g + i))
        err = np.array(pooled) - args.precision
        print(f"{rule:8s}, each group calibrating in turn, the other {len(groups) - 1} measuring "
              f"(pooled): {', '.join(f'{m:.4f}' for m in pooled)}; within ±{args.tolerance:g} in "
              f"{int(np.sum(np.abs(err) <= args.tolerance))}/{len(groups)}, error mean "
              f"{err.mean():+.4f}, sd {err.std():.4f}")
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
    ap.add_argument("--group-seed", type=int, default=0, help="draws the groups of new people")
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
