"""Same-person calibration: binned pair scores, thresholds at a precision, the logistic fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from strongreid.errors import StrongReIDError
from strongreid.evaluation.calibration import Calibration, calibrate, measure, pair_histograms


def _unit(deg: float) -> list[float]:
    r = np.deg2rad(deg)
    return [float(np.cos(r)), float(np.sin(r))]


def test_histograms_by_hand():
    # Query A (cam 0) at 0 degrees; gallery: A cam 1 at 0 (cos 1), A cam 0 at 60 (junk: same
    # camera), B cam 1 at 100 (cos -0.17), junk pid -1 at 0. Bins of 0.5 over [-1, 1].
    q = [_unit(0)]
    g = [_unit(0), _unit(60), _unit(100), _unit(0)]
    gen, imp = pair_histograms(q, g, [1], [1, 1, 2, -1], [0], [1, 0, 1, 1], bins=4)
    assert gen.tolist() == [0, 0, 0, 1] and imp.tolist() == [0, 1, 0, 0]


def _calibration(genuine, impostor) -> Calibration:
    return Calibration(tuple(genuine), tuple(impostor), 10.0, 0.0)


def test_operating_point_by_hand():
    # 4 bins: [-1,-.5) [-.5,0) [0,.5) [.5,1). Scores >= 0.5: 3 genuine, 1 impostor (0.75);
    # >= 0: 4 genuine, 4 impostor (0.5); >= -0.5: 4 and 10.
    cal = _calibration([0, 0, 1, 3], [0, 6, 3, 1])
    assert cal.operating_point(0.7) == {"threshold": 0.5, "precision": 0.75, "recall": 0.75}
    assert cal.operating_point(0.5) == {"threshold": 0.0, "precision": 0.5, "recall": 1.0}
    assert cal.same_person([0.6, 0.2, -0.9], precision=0.7).tolist() == [True, False, False]
    with pytest.raises(StrongReIDError, match="no score threshold reaches precision 0.9"):
        cal.operating_point(0.9)
    with pytest.raises(StrongReIDError, match="between 0 and 1"):
        cal.operating_point(1.0)


def _people(ids: range, views: int, cams: int, seed: int, spread: float = 0.9):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(ids), 64))
    pids = np.repeat(np.asarray(ids), views)
    cams_ = np.tile(np.arange(views) % cams, len(ids))
    x = centres[pids - ids.start] + spread * rng.normal(size=(pids.size, 64))
    return x.astype(np.float32), pids, cams_


def _split(x, pids, cams):
    first = np.zeros(len(pids), bool)
    _, idx = np.unique(pids, return_index=True)
    first[idx] = True
    return (x[first], x[~first], pids[first], pids[~first], cams[first], cams[~first])


def test_a_threshold_holds_on_held_out_identities():
    cal = calibrate(*_split(*_people(range(0, 300), 6, 3, seed=0)))
    held_out = _split(*_people(range(1000, 1300), 6, 3, seed=1))
    res = measure(cal, 0.95, *held_out)
    assert res["requested"] == 0.95
    assert abs(res["measured"] - 0.95) <= 0.03
    assert 0.0 < res["recall"] < 1.0
    assert res["threshold"] == cal.threshold(0.95)


def test_logistic_fit_matches_the_counts():
    cal = calibrate(*_split(*_people(range(0, 100), 5, 3, seed=2)))
    g, i = np.asarray(cal.genuine), np.asarray(cal.impostor)
    centres = cal.edges + 1.0 / len(g)
    # At the maximum-likelihood fit the expected number of genuine pairs equals the observed.
    expected = (cal.probability(centres) * (g + i)).sum()
    assert expected == pytest.approx(g.sum(), rel=1e-6)
    p = cal.probability(np.linspace(-1, 1, 50))
    assert np.all(np.diff(p) > 0) and cal.slope > 0


def test_save_and_load(tmp_path):
    cal = calibrate(*_split(*_people(range(0, 40), 4, 2, seed=3)), source={"model": "best.pt"})
    path = tmp_path / "calibration.json"
    cal.save(path)
    again = Calibration.load(path)
    assert again == cal and again.source["model"] == "best.pt"
    assert json.loads(path.read_text())["score"] == "cosine"
    path.write_text("{not json")
    with pytest.raises(StrongReIDError, match="not a readable calibration file"):
        Calibration.load(path)
    with pytest.raises(StrongReIDError, match="does not exist"):
        Calibration.load(tmp_path / "missing.json")


def test_one_identity_cannot_calibrate():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(StrongReIDError, match="both matching and non-matching pairs"):
        calibrate(x[:2], x[2:], [1, 1], [1, 1], [0, 0], [1, 1])
