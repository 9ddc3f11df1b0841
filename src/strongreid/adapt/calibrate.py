"""`strongreid calibrate`: a model's same-person threshold and probability, written beside it.

Labelled data (`--data`): the identities are split in two (`--holdout`, by identity, so no
person is on both sides); the calibration comes from the first part's pairs and the second
part measures what the threshold really gives on people it never saw: the precision there
(`measured`, against the `requested` one) and the recall. `--measure-on` measures on other
labelled data instead.

Unlabelled data (`--from-clusters`): the images are clustered as the model's adaptation did
(k-reciprocal Jaccard distance, DBSCAN, with its ADAPT settings unless --eps / --min-samples
say otherwise) and the clusters stand in for identities: two images of one cluster are a
genuine pair, of two clusters an impostor pair, DBSCAN's outliers are left out. When the images
are tracklets cut from footage (`strongreid tracklets`), what the footage says for certain is
used: a tracklet is one person (it clusters as a whole), and two tracklets one camera saw at
the same time are two people, so a cluster holding both has merged people and is left out. That is only as right as the clusters: a cluster that merges two look-alikes turns their
impostor pairs into genuine ones (the threshold comes out too low, precision lower than
asked), one person split over clusters does the reverse, and the outliers, the hardest images,
are not in the pairs at all. A precision can only be measured with labels (`--measure-on`);
without them `measured` and `recall` are None.

Pairs follow the evaluation protocol: two images of one identity from one camera are not a
pair (the easy same-tracklet match says nothing about finding someone in another camera). An
image whose camera cannot be read is its own camera. Identity 0 of a test split or of a
folder's file names is Market-1501's distractor label, different people under one number:
each such image counts as a person of its own, and, as in the evaluation, only as a gallery
image: a distractor is never the query of a pair. Two distractors (half bodies, crops of the
same street) can look more alike than any two people; counted as queries they were the
highest-scoring impostor pairs of the street test split and left no threshold at 0.95 on some
splits of it.

The threshold of the requested precision follows the calibration's "logistic" rule
(strongreid.evaluation.calibration): where the fitted expected precision of the accepted pairs
reaches it. A threshold with fewer than MIN_GENUINE_ABOVE calibration pairs of one person at or
above it is refused: the data then say too little about the precision there.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from strongreid.adapt.clustering import pseudo_labels
from strongreid.data.tracklets import FORMAT as TRACKLETS_FORMAT
from strongreid.data.tracklets import MANIFEST_NAME as TRACKLETS_MANIFEST
from strongreid.deploy.extractor import FeatureExtractor, list_images, parse_pid_camid
from strongreid.errors import DatasetError, StrongReIDError
from strongreid.evaluation.calibration import (
    RULES,
    Calibration,
    calibration_path,
    check_people,
    measure,
    pair_histograms,
)
from strongreid.paths import check_output_path

logger = logging.getLogger("strongreid")

SPLIT_CHOICES = ("train", "val", "query", "gallery", "test")
# Fewer genuine pairs than this and a precision of 0.95 rests on a handful of matches: one
# wrong pair more or less moves it by several points.
MIN_GENUINE_PAIRS = 50
MIN_GENUINE_ABOVE = 20


class Images:
    """Image paths with identities (-1: unknown) and cameras (-1: unknown); `queries` is False
    for distractors, which are gallery images only."""

    def __init__(self, paths: list[str], pids: np.ndarray, camids: np.ndarray, where: str,
                 queries: np.ndarray | None = None) -> None:
        self.paths, self.pids, self.camids, self.where = paths, pids, camids, where
        self.queries = np.ones(len(paths), bool) if queries is None else np.asarray(queries, bool)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: np.ndarray) -> Images:
        idx = np.flatnonzero(keep)
        return Images([self.paths[i] for i in idx], self.pids[idx], self.camids[idx], self.where,
                      self.queries[idx])


def read_images(root: str, dataset: str | None = None, split: str = "train",
                flag: str = "--data") -> Images:
    """The images of a folder / list file (identity and camera read from the file names), or
    of one split of a registered dataset (`test`: query and gallery together). `flag`: the
    option that gave `root`, named in the errors."""
    if dataset is None:
        paths = list_images(root, flag)
        ids = np.array([parse_pid_camid(p) for p in paths], np.int64).reshape(-1, 2)
        return Images(paths, _distractors_apart(ids[:, 0]), ids[:, 1], str(root), ids[:, 0] != 0)
    from strongreid.data.datasets import build_dataset

    if split not in SPLIT_CHOICES:
        raise StrongReIDError(f"--split {split!r} is not one of {', '.join(SPLIT_CHOICES)}")
    ds = build_dataset(dataset, root)
    records = {"train": ds.train, "val": ds.val, "query": ds.query, "gallery": ds.gallery,
               "test": [*ds.query, *ds.gallery]}[split]
    if not records:
        raise DatasetError(f"{dataset} under {root} has no {split} split; pick another --split")
    seen: dict[str, tuple[int, int]] = {}
    for r in records:
        seen.setdefault(r.path, (int(r.pid), int(r.camid)))
    ids = np.array(list(seen.values()), np.int64).reshape(-1, 2)
    # The train and val splits are relabelled 0..N-1: there 0 is a person like any other.
    relabelled = split in ("train", "val")
    pids = ids[:, 0] if relabelled else _distractors_apart(ids[:, 0])
    return Images(list(seen), pids, ids[:, 1], f"{dataset} {split} split of {root}",
                  None if relabelled else ids[:, 0] != 0)


def _distractors_apart(pids: np.ndarray) -> np.ndarray:
    """Identity 0 (distractors) -> a new identity per image, above every real one."""
    out = np.asarray(pids, np.int64).copy()
    zero = out == 0
    out[zero] = out.max(initial=0) + 1 + np.arange(int(zero.sum()))
    return out


def labelled(images: Images, flag: str) -> Images:
    """The images with an identity; a clear error when there are none."""
    keep = images.pids >= 0
    if not keep.any():
        raise DatasetError(
            f"{flag} {images.where}: no image has an identity (file names <pid>_c<camera>..., "
            "as in Market-1501, or a --dataset that labels them). For unlabelled images use "
            "--from-clusters, which takes identities from clustering"
        )
    if not keep.all():
        logger.warning("%s: %d image(s) without an identity (junk or unparsed names) left out",
                       images.where, int((~keep).sum()))
    return images.subset(keep)


def own_cameras(camids: np.ndarray) -> np.ndarray:
    """Unknown cameras (-1) become one camera per image, so only an image with itself is left out."""
    cams = np.asarray(camids, np.int64).copy()
    unknown = cams < 0
    cams[unknown] = cams.max(initial=0) + 1 + np.arange(int(unknown.sum()))
    return cams


def split_identities(pids: np.ndarray, holdout: float, seed: int = 0) -> np.ndarray:
    """True for the images whose identity is held out: about `holdout` of the identities,
    drawn with `seed`, never fewer than 2 on either side."""
    ids = np.unique(pids)
    n_held = int(round(holdout * ids.size))
    if ids.size < 4 or not 2 <= n_held <= ids.size - 2:
        raise DatasetError(
            f"{ids.size} identities cannot be split by identity with --holdout {holdout:g}: "
            "each side needs at least 2 people; give more labelled people, another --holdout, "
            "or --holdout 0 with --measure-on"
        )
    held = np.random.default_rng(seed).permutation(ids)[:n_held]
    return np.isin(pids, held)


_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)s\d+_(\d+)_")


def footage_tracklets(images: Images) -> tuple[np.ndarray, np.ndarray] | None:
    """(tracklet id, frame) per image when the images are a training set `strongreid tracklets`
    cut from footage (its manifest beside their folder, <tracklet>_c<camera>s1_<frame>_00.jpg
    names), else None."""
    folders = {Path(p).parent for p in images.paths}
    if len(folders) != 1:
        return None
    manifest = next(iter(folders)).parent / TRACKLETS_MANIFEST
    try:
        if json.loads(manifest.read_text(encoding="utf-8")).get("format") != TRACKLETS_FORMAT:
            return None
    except (OSError, ValueError, AttributeError):
        return None
    found = [_MARKET_NAME.match(Path(p).name) for p in images.paths]
    if not all(found):
        return None
    ids = np.array([[int(m.group(1)), int(m.group(3))] for m in found], np.int64).reshape(-1, 2)
    return ids[:, 0], ids[:, 1]


def seen_together(labels: np.ndarray, tracklets: np.ndarray, frames: np.ndarray,
                  cams: np.ndarray) -> set[int]:
    """The clusters holding two tracklets that one camera saw at the same time (their first to
    last frames overlap): two people for certain, so the cluster has merged people."""
    merged: set[int] = set()
    for cam in np.unique(cams):
        mine = (cams == cam) & (labels >= 0)
        ids = np.unique(tracklets[mine])
        if ids.size < 2:
            continue
        first = np.array([frames[mine & (tracklets == t)].min() for t in ids])
        last = np.array([frames[mine & (tracklets == t)].max() for t in ids])
        # One cluster per tracklet (must-link keeps a tracklet whole); the most common otherwise.
        label = np.array([np.bincount(labels[mine & (tracklets == t)]).argmax() for t in ids])
        overlap = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
        a, b = np.nonzero(np.triu(overlap & (label[:, None] == label[None, :]), 1))
        merged.update(int(x) for x in label[a])
    return merged


def _features(extractor: FeatureExtractor, images: Images) -> np.ndarray:
    return extractor(images.paths).numpy()


def _pairs_of(feats: np.ndarray, pids: np.ndarray, cams: np.ndarray,
              queries: np.ndarray | None = None) -> tuple:
    """calibrate / measure arguments for the pairs within one set: every image is in the
    gallery, every one but the distractors (`queries` False) is a query."""
    q = np.ones(len(pids), bool) if queries is None else queries
    return feats[q], feats, pids[q], pids, cams[q], cams


def calibrate_command(
    model: str,
    *,
    config: str | None = None,
    data: str | None = None,
    from_clusters: str | None = None,
    dataset: str | None = None,
    split: str = "train",
    measure_on: str | None = None,
    measure_dataset: str | None = None,
    measure_split: str = "test",
    precision: float = 0.95,
    holdout: float = 0.5,
    rule: str = "logistic",
    out: str | None = None,
    seed: int = 0,
    eps: float | None = None,
    min_samples: int | None = None,
    people: int | None = None,
    device: str = "auto",
    opts: list[str] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Calibrate `model`, write the JSON beside it (or to `out`) and measure it.

    `people`: the population the written thresholds and probability are for (about how many
    people the gallery that will be searched holds); None: as many as the calibration data.
    The measurement re-targets the calibration to the measured data's own people.

    Returns {path, requested, rule, people, threshold, measured, recall, calibration_precision
    (the rule's), calibration_counted_precision, calibration_recall, genuine_pairs,
    genuine_above, impostor_pairs, identities, held_out_identities, measured_threshold,
    held_out_genuine_pairs, held_out_genuine_above}; the measurement's figures are None when
    nothing labelled was held out, or when among the measured people no threshold reaches the
    precision (then `measurement_refused` says so).
    """
    if (data is None) == (from_clusters is None):
        raise StrongReIDError("give the calibration images: --data LABELLED (folder, list file or "
                              "dataset root) or --from-clusters UNLABELLED")
    if isinstance(precision, bool) or not 0.0 < float(precision) < 1.0:
        raise StrongReIDError(f"--precision must be between 0 and 1 (exclusive), got {precision!r}")
    if not 0.0 <= float(holdout) < 1.0:
        raise StrongReIDError(f"--holdout must be in [0, 1), got {holdout!r}")
    if rule not in RULES:
        raise StrongReIDError(f"--rule must be one of {', '.join(RULES)}, got {rule!r}")
    if people is not None:
        check_people(people, "--people")  # before the features are computed
    if not Path(model).is_file():
        raise StrongReIDError(f"--model {model} does not exist: give a trained checkpoint "
                              "(e.g. runs/demo/best.pt)")
    # Checked before any image is read or embedded: a path that cannot be written costs nothing.
    target = check_output_path(out if out else calibration_path(model),
                               "--out" if out else "--out (default: beside --model)",
                               make_parents=False)
    source: dict[str, Any] = {"model": Path(model).name}
    if from_clusters is None:
        pool = labelled(read_images(data, dataset, split, "--data"), "--data")
        source.update(kind="labels", data=pool.where)
    else:
        pool = read_images(from_clusters, dataset, split, "--from-clusters")
        source.update(kind="clusters", data=pool.where)
    measured_on = None
    if measure_on:
        measured_on = labelled(read_images(measure_on, measure_dataset or dataset, measure_split,
                                           "--measure-on"), "--measure-on")
    if measured_on is not None and set(measured_on.paths) & set(pool.paths):
        raise StrongReIDError(f"--measure-on {measured_on.where} shares images with the "
                              f"calibration images {pool.where}: measure on other people")

    # A calibration already beside the model is not loaded: it is being replaced, and an old
    # or broken one must not stop the new one.
    extractor = FeatureExtractor(config, model, device=device, opts=opts or None,
                                 calibration=False)
    feats = _features(extractor, pool)
    cams, queries = own_cameras(pool.camids), pool.queries
    held: np.ndarray | None = None
    if from_clusters is not None:
        adapt = extractor.cfg.get("ADAPT")
        eps = float(adapt.EPS if adapt and eps is None else 0.6 if eps is None else eps)
        min_samples = int(adapt.MIN_SAMPLES if adapt and min_samples is None
                          else 4 if min_samples is None else min_samples)
        k1, k2 = (int(adapt.K1), int(adapt.K2)) if adapt else (30, 6)
        tracklets = footage_tracklets(pool)
        pids = pseudo_labels(feats, eps=eps, min_samples=min_samples, k1=k1, k2=k2,
                             must_link=None if tracklets is None else tracklets[0])
        merged: set[int] = set()
        if tracklets is not None:
            merged = seen_together(pids, *tracklets, cams)
            pids = np.where(np.isin(pids, sorted(merged)), -1, pids)
        kept = pids >= 0
        clusters = int(np.unique(pids[kept]).size)
        source.update(clusters=clusters, outliers=int((~kept).sum()), eps=eps,
                      min_samples=min_samples, k1=k1, k2=k2, tracklets=tracklets is not None,
                      merged_clusters_dropped=len(merged))
        if clusters < 2:
            raise StrongReIDError(
                f"clustering {pool.where} found {clusters} cluster(s) of {len(pool)} images "
                f"(eps {eps:g}, min_samples {min_samples}): calibration needs at least two "
                "pseudo-identities; give more images, or a larger --eps / smaller --min-samples"
            )
        feats, pids, cams, queries = feats[kept], pids[kept], cams[kept], queries[kept]
    else:
        pids = pool.pids
        if measured_on is None and holdout > 0:
            held = split_identities(pids, holdout, seed)
    mine = ~held if held is not None else np.ones(len(pids), bool)
    counts = pair_histograms(*_pairs_of(feats[mine], pids[mine], cams[mine], queries[mine]))
    genuine = int(counts[0].sum())
    if genuine < MIN_GENUINE_PAIRS:
        raise StrongReIDError(
            f"only {genuine} same-person pairs (two images of one "
            f"{'cluster' if from_clusters else 'identity'} from different cameras) in "
            f"{pool.where}; at least {MIN_GENUINE_PAIRS} are needed for a threshold at a "
            "precision to mean anything: give more images per person and camera"
        )
    # The people the pairs came from (their queries: distractors are gallery images only):
    # what `people` re-targets from.
    source["people"] = int(np.unique(pids[mine & queries]).size)
    calibration = Calibration.from_counts(*counts, source, rule).for_people(people)
    point = calibration.operating_point(precision)
    counted = calibration.counted(point["threshold"])
    if counted["genuine"] < MIN_GENUINE_ABOVE:
        raise StrongReIDError(
            f"precision {precision:g} needs cosine threshold {point['threshold']:.4f}, and only "
            f"{counted['genuine']} same-person pair(s) of {pool.where} score that high (at "
            f"least {MIN_GENUINE_ABOVE} are needed to say what precision it gives): ask for a "
            "lower --precision, or calibrate on more people"
        )
    result: dict[str, Any] = {
        "path": str(target), "requested": float(precision), "rule": rule,
        "people": calibration.people or source["people"],
        "threshold": point["threshold"], "measured": None, "recall": None,
        "measured_threshold": None,
        "calibration_precision": point["precision"],
        "calibration_counted_precision": counted["precision"],
        "calibration_recall": point["recall"], "genuine_pairs": genuine,
        "genuine_above": counted["genuine"],
        "impostor_pairs": calibration.source["impostor_pairs"],
        "identities": int(np.unique(pids[mine]).size), "held_out_identities": 0,
        "held_out_genuine_pairs": None, "held_out_genuine_above": None,
    }
    check, pairs = None, None
    if held is not None:
        pairs = _pairs_of(feats[held], pids[held], cams[held], queries[held])
        result["held_out_identities"] = int(np.unique(pids[held]).size)
        where = f"held-out identities of {pool.where}"
    elif measured_on is not None:
        m_feats = _features(extractor, measured_on)
        m_cams = own_cameras(measured_on.camids)
        pairs = _pairs_of(m_feats, measured_on.pids, m_cams, measured_on.queries)
        result["held_out_identities"] = int(np.unique(measured_on.pids).size)
        where = measured_on.where
    if pairs is not None:
        try:
            check = measure(calibration, precision, *pairs)
        except StrongReIDError as exc:
            # The calibration holds for its own people; among the measured ones (more of them)
            # no threshold reaches the precision. Written, with the reason, not measured.
            result["measurement_refused"] = str(exc)
            source["measurement"] = {"on": where, "requested": float(precision),
                                     "refused": str(exc)}
    if check is not None:
        result["measured"], result["recall"] = check["measured"], check["recall"]
        result["measured_threshold"] = check["threshold"]
        result["held_out_genuine_pairs"] = check["genuine_pairs"]
        result["held_out_genuine_above"] = check["genuine_accepted"]
        source["measurement"] = {"on": where, "requested": float(precision),
                                 "measured": check["measured"], "recall": check["recall"],
                                 "identities": result["held_out_identities"],
                                 "people": check["people"], "threshold": check["threshold"],
                                 "genuine_pairs": check["genuine_pairs"],
                                 "genuine_accepted": check["genuine_accepted"],
                                 "impostor_accepted": check["impostor_accepted"]}
    final = Calibration(calibration.genuine, calibration.impostor, calibration.slope,
                        calibration.intercept, {**calibration.source, **source}, rule,
                        calibration.people)
    try:
        final.save(target)
    except OSError as exc:  # Calibration.save leaves no temporary file behind
        raise StrongReIDError(f"cannot write the calibration {target} ({exc.strerror or exc}); "
                              "check the path, its permissions and the free space (or give "
                              "--out)") from None
    if not quiet:
        _print(result, calibration)
    return result


def _print(result: dict[str, Any], calibration: Calibration) -> None:
    print(f"calibration written to {result['path']} ({result['genuine_pairs']} same-person and "
          f"{result['impostor_pairs']} other pairs of {result['identities']} "
          f"{'clusters' if calibration.source.get('kind') == 'clusters' else 'identities'})")
    how = "fitted" if result["rule"] == "logistic" else "counted"
    print(f"precision {result['requested']:g} among {result['people']} people: cosine threshold "
          f"{result['threshold']:.4f}; on the "
          f"calibration pairs {how} precision {result['calibration_precision']:.4f}, counted "
          f"{result['calibration_counted_precision']:.4f}, recall "
          f"{result['calibration_recall']:.4f} ({result['genuine_above']} same-person pairs "
          "at or above it)")
    if result.get("measurement_refused"):
        print(f"held-out measurement: none ({result['measurement_refused']})")
    elif result["measured"] is None:
        print("held-out measurement: none (no labelled held-out data; give --measure-on LABELLED "
              "or --holdout with --data)")
    else:
        print(f"held-out ({result['held_out_identities']} identities never used to calibrate; "
              f"threshold {result['measured_threshold']:.4f} for their number of people): "
              f"requested precision {result['requested']:g}, measured {result['measured']:.4f}, "
              f"recall {result['recall']:.4f} ({result['held_out_genuine_above']} of "
              f"{result['held_out_genuine_pairs']} same-person pairs accepted)")


__all__ = ["MIN_GENUINE_ABOVE", "MIN_GENUINE_PAIRS", "SPLIT_CHOICES", "Images", "calibrate_command",
           "footage_tracklets", "own_cameras", "read_images", "seen_together", "split_identities"]
