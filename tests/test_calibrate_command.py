"""`strongreid calibrate` end to end on a tiny trained model, and FeatureExtractor's decisions.

The model trains for a few epochs on the tiny synthetic set; calibration data are people of
another synthetic seed (never trained on). Everything the command reports is recomputed here
from the written JSON and fresh features, pair by pair.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_utils import tiny_train_opts
from hypothesis import given, settings
from hypothesis import strategies as st

from strongreid.adapt.calibrate import (
    Images,
    calibrate_command,
    footage_tracklets,
    read_images,
    seen_together,
    split_identities,
)
from strongreid.cli import main
from strongreid.config import load_config
from strongreid.deploy.extractor import FeatureExtractor
from strongreid.errors import StrongReIDError
from strongreid.evaluation.calibration import Calibration, calibration_path
from strongreid.workflows import build_trainer

# A model trained for seconds is far from precise: the requested precisions are low, and what
# is checked is that every figure the command reports is what its threshold really gives.
P = 0.1


@pytest.fixture(scope="module")
def trained(tiny_synthetic_root, tmp_path_factory) -> dict:
    from strongreid.data.synthetic import generate

    root = tmp_path_factory.mktemp("calibrate")
    out = root / "run"
    build_trainer(load_config(None, tiny_train_opts(
        tiny_synthetic_root, out, **{"SOLVER.MAX_EPOCHS": 6, "SOLVER.EVAL_PERIOD": 6,
                                     "TEST.NECK_FEAT": "before"}))).fit()
    # Other people (another seed) of the same look: labelled validation data.
    generate(str(root / "val"), ids=24, cams=3, images_per_id=8, seed=5)
    return {"model": out / "best.pt", "val": root / "val", "root": root,
            "data": tiny_synthetic_root}


def _fresh_model(trained: dict, tmp_path: Path) -> Path:
    model = tmp_path / "best.pt"
    shutil.copy(trained["model"], model)
    return model


def _pairs(feats: np.ndarray, pids: np.ndarray, cams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine scores and same-identity flags of every ordered pair of different cameras or
    identities, written out as loops (what the protocol counts)."""
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    scores, same = [], []
    for i in range(len(f)):
        for j in range(len(f)):
            if pids[i] == pids[j] and cams[i] == cams[j]:
                continue
            scores.append(float(f[i] @ f[j]))
            same.append(pids[i] == pids[j])
    return np.asarray(scores), np.asarray(same)


def test_labelled_calibration_end_to_end(trained, tmp_path, capsys):
    model = _fresh_model(trained, tmp_path)
    rc = main(["calibrate", "--model", str(model), "--data", str(trained["val"]), "--dataset",
               "synthetic", "--precision", str(P), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    path = tmp_path / "best.calibration.json"
    assert path.is_file() and f"calibration written to {path}" in out
    cal = Calibration.load(path)
    assert cal.source["kind"] == "labels" and cal.source["model"] == "best.pt"
    m = cal.source["measurement"]
    assert m["requested"] == P and f"measured {m['measured']:.4f}" in out

    # The measurement, recomputed: the held-out identities' pairs at the stored threshold.
    images = read_images(str(trained["val"]), "synthetic", "train")
    held = split_identities(images.pids, 0.5, seed=0)
    assert not set(images.pids[held]) & set(images.pids[~held])
    extractor = FeatureExtractor(None, model, device="cpu")
    assert extractor.calibration == cal and extractor.calibration_file == str(path)
    feats = extractor([p for p, h in zip(images.paths, held) if h]).numpy()
    scores, same = _pairs(feats, images.pids[held], images.camids[held])
    accepted = cal.same_person(scores, P)
    assert m["measured"] == pytest.approx(same[accepted].mean(), abs=1e-9)
    assert m["recall"] == pytest.approx(same[accepted].sum() / same.sum(), abs=1e-9)
    assert m["identities"] == len(set(images.pids[held]))
    # Nothing held out went into the calibration counts.
    _, cal_same = _pairs(extractor([p for p, h in zip(images.paths, held) if not h]).numpy(),
                         images.pids[~held], images.camids[~held])
    assert sum(cal.genuine) == cal_same.sum() and sum(cal.impostor) == (~cal_same).sum()

    # FeatureExtractor's decisions agree with the stored threshold, on features and on images.
    a, b = feats[:6], feats[6:12]
    expected = cal.same_person(extractor.similarity(a, b), P)
    assert np.array_equal(extractor.same_person(a, b, precision=P), expected)
    paths = [p for p, h in zip(images.paths, held) if h]
    assert np.array_equal(extractor.same_person(paths[:6], torch.from_numpy(feats[6:12]), P),
                          expected)
    assert extractor.same_person(feats[0], feats[0], P).tolist() == [True]
    p = extractor.probability(np.linspace(-1, 1, 11))
    assert np.all(np.diff(p) > 0) and p == pytest.approx(cal.probability(np.linspace(-1, 1, 11)))
    with pytest.raises(StrongReIDError, match="features of this model have"):
        extractor.same_person(np.zeros((2, 3), np.float32), feats[:2])


def test_the_library_call_returns_what_it_wrote(trained, tmp_path):
    model = _fresh_model(trained, tmp_path)
    out = tmp_path / "elsewhere.json"
    res = calibrate_command(str(model), data=str(trained["val"]), dataset="synthetic",
                            split="test", precision=P, holdout=0.4, seed=3, out=str(out),
                            device="cpu", quiet=True, rule="counts")
    assert res["path"] == str(out) and not calibration_path(model).exists()
    cal = Calibration.load(out)
    point = cal.operating_point(P)
    assert res["threshold"] == point["threshold"] and res["requested"] == P
    assert res["calibration_precision"] == point["precision"] >= P
    assert res["measured"] == cal.source["measurement"]["measured"]
    assert res["genuine_pairs"] == sum(cal.genuine) and res["impostor_pairs"] == sum(cal.impostor)
    ids = len(set(read_images(str(trained["val"]), "synthetic", "test").pids))
    assert res["identities"] + res["held_out_identities"] == ids
    assert res["held_out_identities"] == round(0.4 * ids)
    # The people the pairs came from are recorded (queries only: distractors are gallery
    # images), and the held-out measurement is made for the held-out side's own people.
    images = read_images(str(trained["val"]), "synthetic", "test")
    real = len(set(images.pids[images.queries]))
    held_people = cal.source["measurement"]["people"]
    assert cal.source["people"] + held_people == real and res["people"] == cal.source["people"]
    assert cal.people is None  # written for its own population
    assert res["measured_threshold"] == cal.for_people(held_people).threshold(P)


def test_a_calibration_for_a_bigger_gallery(trained, tmp_path):
    # (The tiny model barely ranks: genuine pairs are a few percent of those above any score.)
    model = _fresh_model(trained, tmp_path)
    args = dict(data=str(trained["val"]), dataset="synthetic", split="test", precision=0.04,
                holdout=0.0, device="cpu", quiet=True)
    own = calibrate_command(str(model), out=str(tmp_path / "own.json"), **args)
    more = 5 * own["people"] // 4
    big = calibrate_command(str(model), out=str(tmp_path / "big.json"), people=more, **args)
    cal = Calibration.load(tmp_path / "big.json")
    assert cal.people == big["people"] == more and Calibration.load(tmp_path / "own.json").people is None
    # A quarter more people: each impostor pair weighs about a quarter more, so the same
    # precision needs a higher threshold; among twice the people this model reaches none.
    assert big["threshold"] > own["threshold"] and cal.operating_point(0.04)["threshold"] == big["threshold"]
    with pytest.raises(StrongReIDError, match="no score threshold reaches precision 0.04"):
        calibrate_command(str(model), out=str(tmp_path / "twice.json"), people=2 * own["people"], **args)
    assert not (tmp_path / "twice.json").exists()


def test_from_clusters_measured_on_labels(trained, tmp_path, capsys):
    model = _fresh_model(trained, tmp_path)
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    # No identity in the names: only clustering can pair these images.
    for i, path in enumerate(read_images(str(trained["val"]), "synthetic", "test").paths):
        shutil.copy(path, unlabelled / f"crop{i:04d}.jpg")
    rc = main(["calibrate", "--model", str(model), "--from-clusters", str(unlabelled),
               "--measure-on", str(trained["val"]), "--measure-dataset", "synthetic",
               "--measure-split", "train", "--precision", str(P), "--eps", "0.3",
               "--min-samples", "3", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    cal = Calibration.load(calibration_path(model))
    assert cal.source["kind"] == "clusters" and cal.source["clusters"] >= 2
    assert "measured" in cal.source["measurement"] and "held-out (" in out

    # Without labelled data to measure on, nothing is claimed.
    res = calibrate_command(str(model), from_clusters=str(unlabelled), precision=P, eps=0.3,
                            min_samples=3, device="cpu", quiet=True)
    assert res["measured"] is None and res["recall"] is None


def test_a_measurement_among_more_people_is_refused_not_faked(trained, tmp_path, capsys):
    # A quarter of the people calibrate, three quarters measure. More people lower every
    # precision, so some precision is reached among the calibration's people and not among the
    # measured ones: asked for that, the calibration is written for its own people and the
    # measurement says why there is none.
    model = _fresh_model(trained, tmp_path)
    args = dict(data=str(trained["val"]), dataset="synthetic", split="test", holdout=0.75,
                device="cpu")
    first = calibrate_command(str(model), precision=0.01, out=str(tmp_path / "first.json"),
                              quiet=True, **args)
    cal = Calibration.load(tmp_path / "first.json")
    held_people = cal.source["measurement"]["people"]
    assert held_people > first["people"]
    own_max = cal.fitted_precision().max()
    held_max = cal.for_people(held_people).fitted_precision().max()
    wanted = float(held_max + 0.1 * (own_max - held_max))
    out = tmp_path / "c.json"
    res = calibrate_command(str(model), precision=wanted, out=str(out), **args)
    assert res["measured"] is None and res["recall"] is None
    assert res["measurement_refused"].startswith(f"among the {held_people} people measured on")
    assert f"no score threshold reaches precision {wanted:g}" in res["measurement_refused"]
    written = Calibration.load(out)
    assert written.source["measurement"]["refused"] == res["measurement_refused"]
    assert written.threshold(wanted) == res["threshold"]
    assert "held-out measurement: none (among the " in capsys.readouterr().out


def test_distractors_are_gallery_images_only(trained, tmp_path):
    # The test split has distractors (identity 0): each its own person, never a query.
    model = _fresh_model(trained, tmp_path)
    # Below the share of genuine pairs (about 1 in 18 here): every pair is accepted.
    res = calibrate_command(str(model), data=str(trained["val"]), dataset="synthetic",
                            split="test", precision=0.04, holdout=0, device="cpu", quiet=True)
    images = read_images(str(trained["val"]), "synthetic", "test")
    assert 0 < (~images.queries).sum() < len(images)
    feats = FeatureExtractor(None, model, device="cpu")(images.paths).numpy()
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    genuine = impostor = 0
    for i in np.flatnonzero(images.queries):
        for j in range(len(f)):
            if images.pids[i] == images.pids[j]:
                genuine += int(images.camids[i] != images.camids[j])
            else:
                impostor += 1
    cal = Calibration.load(res["path"])
    assert (sum(cal.genuine), sum(cal.impostor)) == (genuine, impostor)
    assert cal.rule == "logistic" and res["rule"] == "logistic"
    assert res["genuine_above"] == cal.counted(res["threshold"])["genuine"] >= 20
    assert res["measured"] is None and res["held_out_genuine_pairs"] is None


def test_the_counts_rule_from_the_command_line(trained, tmp_path, capsys):
    model = _fresh_model(trained, tmp_path)
    rc = main(["calibrate", "--model", str(model), "--data", str(trained["val"]), "--dataset",
               "synthetic", "--precision", str(P), "--rule", "counts", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    cal = Calibration.load(calibration_path(model))
    point = cal.operating_point(P)
    assert cal.rule == "counts" and point["precision"] == cal.counted(point["threshold"])["precision"]
    assert f"cosine threshold {point['threshold']:.4f}; on the calibration pairs counted" in out
    m = cal.source["measurement"]
    assert f"({m['genuine_accepted']} of {m['genuine_pairs']} same-person pairs accepted)" in out


def test_a_precision_the_data_cannot_support_is_refused(trained, tmp_path, capsys):
    model = _fresh_model(trained, tmp_path)
    err = _error(capsys, "--model", str(model), "--data", str(trained["val"]), "--dataset",
                 "synthetic", "--precision", "0.999", "--device", "cpu")
    assert ("no score threshold reaches precision 0.999" in err
            or "same-person pair(s) of" in err and "at least 20 are needed" in err)
    assert not calibration_path(model).exists()


def _tracklet_set(trained: dict, root: Path) -> Path:
    """The val people as `strongreid tracklets` writes them: one tracklet per person and camera
    (frames 10 apart), and people 1 and 2 seen at the same time by their first camera."""
    folder = root / "tracklets" / "bounding_box_train"
    folder.mkdir(parents=True)
    (root / "tracklets" / "manifest.json").write_text(json.dumps({"format": "strongreid-tracklets/1"}))
    images = read_images(str(trained["val"]), "synthetic", "train")
    tracklet: dict[tuple[int, int], int] = {}
    length: dict[int, int] = {}
    for i, (pid, cam) in enumerate(zip(images.pids, images.camids)):
        t = tracklet.setdefault((pid, cam), len(tracklet) + 1)
        length[t] = length.get(t, 0) + 1
        frame = (0 if pid in (1, 2) else 1000 * t) + 10 * length[t]
        shutil.copy(images.paths[i], folder / f"{t:06d}_c{cam + 1}s1_{frame:06d}_00.jpg")
    return folder


def test_tracklets_from_footage(trained, tmp_path):
    folder = _tracklet_set(trained, tmp_path)
    images = read_images(str(folder))
    tracklets, frames = footage_tracklets(images)
    assert np.array_equal(tracklets, images.pids)
    assert all(f"_{fr:06d}_00.jpg" in p for p, fr in zip(images.paths, frames))
    # Without the manifest the names alone do not make a tracklet set.
    (folder.parent / "manifest.json").unlink()
    assert footage_tracklets(read_images(str(folder))) is None


def test_seen_together_by_hand():
    # Camera 1: tracklet 1 frames 0-10, 2 frames 5-15 (overlap), 3 frames 20-30; camera 2:
    # tracklet 4 frames 0-10, at the same time as 1 but elsewhere.
    tracklets = np.array([1, 1, 2, 2, 3, 3, 4, 4])
    frames = np.array([0, 10, 5, 15, 20, 30, 0, 10])
    cams = np.array([1, 1, 1, 1, 1, 1, 2, 2])
    # 1 and 3 one after the other, 2 and 4 in two cameras: nobody merged.
    assert seen_together(np.repeat([0, 1, 0, 1], 2), tracklets, frames, cams) == set()
    # 1 and 2 in one cluster: seen at the same time by camera 1.
    assert seen_together(np.repeat([0, 0, 1, 1], 2), tracklets, frames, cams) == {0}
    # Outliers (-1) are no cluster.
    assert seen_together(np.repeat([-1, -1, 3, 3], 2), tracklets, frames, cams) == set()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2), st.integers(0, 50), st.integers(0, 20),
                          st.integers(-1, 3)), min_size=1, max_size=12))
def test_seen_together_finds_every_merge(spans):
    # One tracklet per entry: (camera, first frame, length, cluster), two images each.
    tracklets = np.repeat(np.arange(len(spans)), 2)
    cams = np.repeat([c for c, _, _, _ in spans], 2)
    frames = np.array([f for _, a, n, _ in spans for f in (a, a + n)])
    labels = np.repeat([c for _, _, _, c in spans], 2)
    expected = {ca for i, (c, a, n, ca) in enumerate(spans) for j, (d, b, m, cb) in enumerate(spans)
                if i < j and c == d and ca == cb >= 0 and a <= b + m and b <= a + n}
    assert seen_together(labels, tracklets, frames, cams) == expected


def test_images_keep_their_queries_when_subset():
    images = Images(["a", "b", "c"], np.array([1, 2, 3]), np.array([0, 0, 1]), "x",
                    np.array([True, False, True]))
    assert images.subset(np.array([False, True, True])).queries.tolist() == [False, True]
    assert Images(["a"], np.array([1]), np.array([0]), "x").queries.tolist() == [True]


def test_test_images_are_never_read(trained, tmp_path):
    # A copy of the training data whose query and gallery images are not images: a calibration
    # on the (default) train split would fail if it touched them.
    data = tmp_path / "data"
    shutil.copytree(trained["data"], data)
    for split in ("query", "bounding_box_test"):
        for image in (data / "synthetic" / split).iterdir():
            image.write_bytes(b"not an image")
    model = _fresh_model(trained, tmp_path)
    res = calibrate_command(str(model), data=str(data), dataset="synthetic", precision=P,
                            device="cpu", quiet=True)
    assert res["measured"] is not None
    with pytest.raises(StrongReIDError, match="not an image|cannot|decode|read"):
        calibrate_command(str(model), data=str(data), dataset="synthetic", split="test",
                          precision=P, device="cpu", quiet=True)


@settings(max_examples=60, deadline=None)
@given(pids=st.lists(st.integers(0, 40), min_size=8, max_size=120),
       holdout=st.floats(0.05, 0.95), seed=st.integers(0, 10))
def test_split_by_identity(pids, holdout, seed):
    pids = np.asarray(pids)
    n = len(np.unique(pids))
    try:
        held = split_identities(pids, holdout, seed)
    except StrongReIDError as exc:
        assert "cannot be split by identity" in str(exc)
        assert n < 4 or not 2 <= round(holdout * n) <= n - 2
        return
    assert not set(pids[held]) & set(pids[~held])
    assert len(set(pids[held])) == round(holdout * n)
    assert np.array_equal(held, split_identities(pids, holdout, seed))


# -- errors: one line each ----------------------------------------------------------------------


def _error(capsys, *argv: str) -> str:
    rc = main(["calibrate", *argv])
    captured = capsys.readouterr()
    assert rc == 2 and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith("error: ")
    return captured.err


def test_missing_model(capsys, tmp_path):
    err = _error(capsys, "--model", str(tmp_path / "none.pt"), "--data", str(tmp_path))
    assert "none.pt does not exist" in err


def test_unlabelled_data_needs_from_clusters(trained, tmp_path, capsys):
    folder = tmp_path / "plain"
    folder.mkdir()
    for i, path in enumerate(read_images(str(trained["val"]), "synthetic", "train").paths[:20]):
        shutil.copy(path, folder / f"frame{i}.jpg")
    err = _error(capsys, "--model", str(trained["model"]), "--data", str(folder))
    assert "no image has an identity" in err and "--from-clusters" in err


def test_too_few_positive_pairs(trained, tmp_path, capsys):
    folder = tmp_path / "few"
    folder.mkdir()
    images = read_images(str(trained["val"]), "synthetic", "train")
    # One image from each of two cameras of six people: 2 ordered same-person pairs for each
    # person seen by two cameras.
    pairs = 0
    for pid in np.unique(images.pids)[:6]:
        idx = np.flatnonzero(images.pids == pid)
        cams = np.unique(images.camids[idx])[:2]
        pairs += 2 if len(cams) == 2 else 0
        for cam in cams:
            i = idx[images.camids[idx] == cam][0]
            shutil.copy(images.paths[i], folder / f"{pid + 1:04d}_c{cam + 1}_{i}.jpg")
    model = _fresh_model(trained, tmp_path)
    err = _error(capsys, "--model", str(model), "--data", str(folder), "--holdout", "0",
                 "--device", "cpu")
    assert f"only {pairs} same-person pairs" in err and "at least 50" in err
    assert not calibration_path(model).exists()


def test_bad_precision_and_holdout(trained, capsys):
    err = _error(capsys, "--model", str(trained["model"]), "--data", str(trained["val"]),
                 "--precision", "1.5")
    assert "--precision must be between 0 and 1" in err
    err = _error(capsys, "--model", str(trained["model"]), "--data", str(trained["val"]),
                 "--holdout", "1")
    assert "--holdout must be in [0, 1)" in err
    err = _error(capsys, "--model", str(trained["model"]), "--data", str(trained["val"]),
                 "--people", "1")
    assert "--people must be a whole number of people, at least 2, got 1" in err


def test_corrupt_calibration_names_the_file(trained, tmp_path):
    model = _fresh_model(trained, tmp_path)
    beside = calibration_path(model)
    beside.write_text("{\"format\": 1, \"bins\": ")
    with pytest.raises(StrongReIDError, match=f"{beside} is not a readable calibration file"):
        FeatureExtractor(None, model, device="cpu")
    # A new calibration replaces a broken one (it is not read on the way).
    res = calibrate_command(str(model), data=str(trained["val"]), dataset="synthetic",
                            precision=P, device="cpu", quiet=True)
    assert json.loads(beside.read_text())["format"] == 1 and res["path"] == str(beside)
    with pytest.raises(StrongReIDError, match="does not exist"):
        FeatureExtractor(None, model, device="cpu", calibration=tmp_path / "missing.json")


def test_a_model_without_calibration_still_extracts(trained, tmp_path):
    model = _fresh_model(trained, tmp_path)
    extractor = FeatureExtractor(None, model, device="cpu")
    assert extractor.calibration is None
    image = read_images(str(trained["val"]), "synthetic", "train").paths[0]
    f = extractor([image])
    assert f.shape == (1, extractor.feat_dim)
    for call in (lambda: extractor.probability([0.5]), lambda: extractor.same_person(f, f)):
        with pytest.raises(StrongReIDError, match="has no calibration.*strongreid calibrate"):
            call()
