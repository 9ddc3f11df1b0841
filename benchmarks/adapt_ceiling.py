"""How far the adaptation recipe could go with perfect pseudo-identities: its ceiling.

Runs `strongreid train` with an adaptation config exactly as given, except that the clustering
before each epoch is replaced by the training images' true identities (read from Market-style
file names, or for a `strongreid tracklets` cut from the footage's gt.txt, each crop taking
the person of its best-overlapping gt box). Everything else (AdaBN, the cluster memory, P x K
sampling, iterations, schedule, the test) is the recipe's own. The gap between this and the
real adaptation is what better pseudo-identities could win; the gap between this and
supervised training is the recipe's and the data's.

    python benchmarks/adapt_ceiling.py -- --config configs/adapt_night.yml OUTPUT_DIR runs/ceiling
    python benchmarks/adapt_ceiling.py --footage data/night/footage -- --config configs/adapt_night.yml \
        DATASETS.NAMES tracklets DATASETS.TEST_NAME synthetic OUTPUT_DIR runs/ceiling_footage

A diagnostic that reads the labels on purpose: never a way to train a model you ship.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def true_identities(footage: str | None, cut: str | None) -> dict[str, int]:
    """File name -> person, for a tracklet cut of `footage` (crops no gt box covers: -1)."""
    if footage is None:
        return {}
    from strongreid.data.tracklets import crop_people

    return {os.path.basename(row["image"]): -1 if person is None else int(person)
            for row, person in crop_people(cut, footage)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--footage", help="the footage a `tracklets` training set was cut from (its gt.txt "
                                      "names the people); without it, identities come from file names")
    ap.add_argument("--cut", help="the tracklet cut (default: DATASETS.ROOT_DIR/tracklets)")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then `strongreid train` arguments")
    args = ap.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    if args.footage and not args.cut:
        root = train_args[train_args.index("DATASETS.ROOT_DIR") + 1] if "DATASETS.ROOT_DIR" in train_args else "data"
        args.cut = str(Path(root) / "tracklets")
    truth = true_identities(args.footage, args.cut)

    from strongreid.adapt import hooks
    from strongreid.cli import main as cli
    from strongreid.deploy.extractor import parse_pid_camid

    def perfect_clusters(self: hooks.PseudoLabelHook, feats: object) -> np.ndarray:
        names = [os.path.basename(r.path) for r in self.records]
        people = np.asarray([truth[n] if truth else parse_pid_camid(n)[0] for n in names])
        _, labels = np.unique(people, return_inverse=True)
        labels = labels.astype(np.int64)
        labels[people < 0] = -1  # no person known: left out, as DBSCAN's outliers are
        return labels

    hooks.PseudoLabelHook._cluster = perfect_clusters
    return cli(["train", *train_args])


if __name__ == "__main__":
    sys.exit(main())
