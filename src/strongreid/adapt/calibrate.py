"""`strongreid calibrate`: a model's same-person threshold and probability, written beside it.

Labelled data (`--data`): the identities are split in two (`--holdout`, by identity, so no
person is on both sides); the calibration comes from the first part's pairs and the second
part measures what the threshold really gives on people it never saw: the precision there
(`measured`, against the `requested` one) and the recall. `--measure-on` measures on other
labelled data instead.

Unlabelled data (`--from-clusters`): the images are clustered as adaptation does
(k-reciprocal Jaccard distance, DBSCAN) and the clusters stand in for identities: two images of
one cluster are a genuine pair, of two clusters an impostor pair, DBSCAN's outliers are left
out. That is only as right as the clusters: a cluster that merges two look-alikes turns their
impostor pairs into genuine ones (the threshold comes out too low, precision lower than
asked), one person split over clusters does the reverse, and the outliers, the hardest images,
are not in the pairs at all. A precision can only be measured with labels (`--measure-on`);
without them `measured` and `recall` are None.

Pairs follow the evaluation protocol: two images of one identity from one camera are not a
pair (the easy same-tracklet match says nothing about finding someone in another camera). An
image whose camera cannot be read is its own camera. Identity 0 of a test split or of a
folder's file names is Market-1501's distractor label, different people under one number:
each such image counts as a person of its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from strongreid.adapt.clustering import pseudo_labels
from strongreid.deploy.extractor import FeatureExtractor, list_images, parse_pid_camid
from strongreid.errors import DatasetError, StrongReIDError
from strongreid.evaluation.calibration import (
    Calibration,
    calibration_path,
    measure,
    pair_histograms,
)

logger = logging.getLogger("strongreid")

SPLIT_CHOICES = ("train", "val", "query", "gallery", "test")
# Fewer genuine pairs than this and a precision of 0.95 rests on a handful of matches: one
# wrong pair more or less moves it by several points.
MIN_GENUINE_PAIRS = 50


class Images:
    """Image paths with identities (-1: unknown) and cameras (-1: unknown)."""

    def __init__(self, paths: list[str], pids: np.ndarray, camids: np.ndarray, where: str) -> None:
        self.paths, self.pids, self.camids, self.where = paths, pids, camids, where

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: np.ndarray) -> Images:
        idx = np.flatnonzero(keep)
        return Images([self.paths[i] for i in idx], self.pids[idx], self.camids[idx], self.where)


def read_images(root: str, dataset: str | None = None, split: str = "train") -> Images:
    """The images of a folder / list file (identity and camera read from the file names), or
    of one split of a registered dataset (`test`: query and gallery together)."""
    if dataset is None:
        paths = list_images(root)
        ids = np.array([parse_pid_camid(p) for p in paths], np.int64).reshape(-1, 2)
        return Images(paths, _distractors_apart(ids[:, 0]), ids[:, 1], str(root))
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
    pids = ids[:, 0] if split in ("train", "val") else _distractors_apart(ids[:, 0])
    return Images(list(seen), pids, ids[:, 1], f"{dataset} {split} split of {root}")


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


def _features(extractor: FeatureExtractor, images: Images) -> np.ndarray:
    return extractor(images.paths).numpy()


def _pairs_of(feats: np.ndarray, pids: np.ndarray, cams: np.ndarray) -> tuple:
    """calibrate / measure arguments for every pair within one set (query = gallery)."""
    return feats, feats, pids, pids, cams, cams


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
    out: str | None = None,
    seed: int = 0,
    eps: float = 0.6,
    min_samples: int = 4,
    device: str = "auto",
    opts: list[str] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Calibrate `model`, write the JSON beside it (or to `out`) and measure it.

    Returns {path, requested, threshold, measured, recall, calibration_precision,
    calibration_recall, genuine_pairs, impostor_pairs, identities, held_out_identities};
    `measured` / `recall` are None when nothing labelled was held out.
    """
    if (data is None) == (from_clusters is None):
        raise StrongReIDError("give the calibration images: --data LABELLED (folder, list file or "
                              "dataset root) or --from-clusters UNLABELLED")
    if isinstance(precision, bool) or not 0.0 < float(precision) < 1.0:
        raise StrongReIDError(f"--precision must be between 0 and 1 (exclusive), got {precision!r}")
    if not 0.0 <= float(holdout) < 1.0:
        raise StrongReIDError(f"--holdout must be in [0, 1), got {holdout!r}")
    if not Path(model).is_file():
        raise StrongReIDError(f"--model {model} does not exist: give a trained checkpoint "
                              "(e.g. runs/demo/best.pt)")
    target = Path(out) if out else calibration_path(model)
    if not target.parent.is_dir():
        raise StrongReIDError(f"cannot write {target}: the folder {target.parent} does not exist")
    source: dict[str, Any] = {"model": Path(model).name}
    if from_clusters is None:
        pool = labelled(read_images(data, dataset, split), "--data")
        source.update(kind="labels", data=pool.where)
    else:
        pool = read_images(from_clusters, dataset, split)
        source.update(kind="clusters", data=pool.where)
    measured_on = None
    if measure_on:
        measured_on = labelled(read_images(measure_on, measure_dataset or dataset, measure_split),
                               "--measure-on")
    if measured_on is not None and set(measured_on.paths) & set(pool.paths):
        raise StrongReIDError(f"--measure-on {measured_on.where} shares images with the "
                              f"calibration images {pool.where}: measure on other people")

    # A calibration already beside the model is not loaded: it is being replaced, and an old
    # or broken one must not stop the new one.
    extractor = FeatureExtractor(config, model, device=device, opts=opts or None,
                                 calibration=False)
    feats = _features(extractor, pool)
    cams = own_cameras(pool.camids)
    held: np.ndarray | None = None
    if from_clusters is not None:
        pids = pseudo_labels(feats, eps=eps, min_samples=min_samples)
        kept = pids >= 0
        clusters = int(np.unique(pids[kept]).size)
        source.update(clusters=clusters, outliers=int((~kept).sum()), eps=float(eps),
                      min_samples=int(min_samples))
        if clusters < 2:
            raise StrongReIDError(
                f"clustering {pool.where} found {clusters} cluster(s) of {len(pool)} images "
                f"(eps {eps:g}, min_samples {min_samples}): calibration needs at least two "
                "pseudo-identities; give more images, or a larger --eps / smaller --min-samples"
            )
        feats, pids, cams = feats[kept], pids[kept], cams[kept]
    else:
        pids = pool.pids
        if measured_on is None and holdout > 0:
            held = split_identities(pids, holdout, seed)
    mine = ~held if held is not None else np.ones(len(pids), bool)
    counts = pair_histograms(*_pairs_of(feats[mine], pids[mine], cams[mine]))
    genuine = int(counts[0].sum())
    if genuine < MIN_GENUINE_PAIRS:
        raise StrongReIDError(
            f"only {genuine} same-person pairs (two images of one "
            f"{'cluster' if from_clusters else 'identity'} from different cameras) in "
            f"{pool.where}; at least {MIN_GENUINE_PAIRS} are needed for a threshold at a "
            "precision to mean anything: give more images per person and camera"
        )
    calibration = Calibration.from_counts(*counts, source)
    point = calibration.operating_point(precision)
    result: dict[str, Any] = {
        "path": str(target), "requested": float(precision), "threshold": point["threshold"],
        "measured": None, "recall": None, "calibration_precision": point["precision"],
        "calibration_recall": point["recall"], "genuine_pairs": genuine,
        "impostor_pairs": calibration.source["impostor_pairs"],
        "identities": int(np.unique(pids[mine]).size), "held_out_identities": 0,
    }
    check = None
    if held is not None:
        check = measure(calibration, precision,
                        *_pairs_of(feats[held], pids[held], cams[held]))
        result["held_out_identities"] = int(np.unique(pids[held]).size)
        where = f"held-out identities of {pool.where}"
    elif measured_on is not None:
        m_feats = _features(extractor, measured_on)
        m_cams = own_cameras(measured_on.camids)
        check = measure(calibration, precision,
                        *_pairs_of(m_feats, measured_on.pids, m_cams))
        result["held_out_identities"] = int(np.unique(measured_on.pids).size)
        where = measured_on.where
    if check is not None:
        result["measured"], result["recall"] = check["measured"], check["recall"]
        source["measurement"] = {"on": where, "requested": float(precision),
                                 "measured": check["measured"], "recall": check["recall"],
                                 "identities": result["held_out_identities"]}
    Calibration(calibration.genuine, calibration.impostor, calibration.slope,
                calibration.intercept, {**calibration.source, **source}).save(target)
    if not quiet:
        _print(result, calibration)
    return result


def _print(result: dict[str, Any], calibration: Calibration) -> None:
    print(f"calibration written to {result['path']} ({result['genuine_pairs']} same-person and "
          f"{result['impostor_pairs']} other pairs of {result['identities']} "
          f"{'clusters' if calibration.source.get('kind') == 'clusters' else 'identities'})")
    print(f"precision {result['requested']:g}: cosine threshold {result['threshold']:.4f}; on the "
          f"calibration pairs precision {result['calibration_precision']:.4f}, recall "
          f"{result['calibration_recall']:.4f}")
    if result["measured"] is None:
        print("held-out measurement: none (no labelled held-out data; give --measure-on LABELLED "
              "or --holdout with --data)")
    else:
        print(f"held-out ({result['held_out_identities']} identities never used to calibrate): "
              f"requested precision {result['requested']:g}, measured {result['measured']:.4f}, "
              f"recall {result['recall']:.4f}")


__all__ = ["MIN_GENUINE_PAIRS", "SPLIT_CHOICES", "Images", "calibrate_command", "own_cameras",
           "read_images", "split_identities"]
