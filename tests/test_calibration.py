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


# -- the probability map and the decision, by hand and as properties ----------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from strongreid.evaluation.calibration import calibration_path, score_bins  # noqa: E402


def test_logistic_by_hand_when_the_pairs_overlap():
    # Two bins, centres -0.5 and 0.5: 1 of 4 pairs genuine below, 3 of 4 above. Two points, two
    # parameters: the maximum-likelihood fit goes through 1/4 and 3/4, so
    # slope * 0.5 + b = ln 3 and -slope * 0.5 + b = -ln 3: slope = 2 ln 3, b = 0.
    cal = Calibration.from_counts([1, 3], [3, 1])
    assert cal.slope == pytest.approx(2 * np.log(3), abs=1e-12)
    assert cal.intercept == pytest.approx(0.0, abs=1e-12)
    p = cal.probability([0.5, -0.5, 0.0, 0.25])
    # sigmoid(ln 3 / 2) = sqrt(3) / (1 + sqrt(3)).
    assert p == pytest.approx([0.75, 0.25, 0.5, np.sqrt(3) / (1 + np.sqrt(3))], abs=1e-12)


def test_logistic_by_hand_when_the_pairs_separate():
    # 5 genuine pairs all above 5 impostors: no maximum likelihood. Platt's targets
    # (5+1)/(5+2) = 6/7 and 1/(5+2) = 1/7 give P(0.5) = 6/7, P(-0.5) = 1/7: slope = 2 ln 6.
    cal = Calibration.from_counts([0, 5], [5, 0])
    assert cal.slope == pytest.approx(2 * np.log(6), abs=1e-12)
    assert cal.probability([0.5, -0.5]) == pytest.approx([6 / 7, 1 / 7], abs=1e-12)


def test_reversed_scores_cannot_be_calibrated():
    with pytest.raises(StrongReIDError, match="do not score higher"):
        Calibration.from_counts([3, 1], [1, 3])


def test_score_bins_by_hand():
    # 4 bins over [-1, 1]: edges -1, -0.5, 0, 0.5; 1.0 falls in the last, outside values clip.
    assert score_bins([-1.0, -0.5, -0.2500001, 0.0, 0.4999, 0.5, 1.0, 1.7, -3.0], 4).tolist() == \
        [0, 1, 1, 2, 2, 3, 3, 3, 0]


def test_calibration_path():
    assert str(calibration_path("runs/x/best.pt")) == "runs/x/best.calibration.json"
    assert str(calibration_path("model.safetensors")) == "model.calibration.json"
    assert str(calibration_path("runs/model")) == "runs/model.calibration.json"


_pairs = st.lists(
    st.tuples(st.floats(-1.0, 1.0, allow_nan=False), st.booleans()), min_size=2, max_size=300,
)


@settings(max_examples=60, deadline=None)
@given(pairs=_pairs, shift=st.floats(0.05, 1.0), grid=st.lists(st.floats(-1.5, 1.5), min_size=2))
def test_probability_rises_with_the_score(pairs, shift, grid):
    scores = np.array([min(1.0, s + shift) if same else s for s, same in pairs])
    same = np.array([m for _, m in pairs])
    try:
        cal = Calibration.from_scores(scores, same, bins=64)
    except StrongReIDError as exc:  # one kind missing, or impostors scoring higher
        assert "both matching" in str(exc) or "do not score higher" in str(exc)
        return
    assert cal.slope > 0
    g = np.sort(np.asarray(grid))
    assert np.all(np.diff(cal.probability(g)) >= 0)


@settings(max_examples=80, deadline=None)
@given(pairs=_pairs, precision=st.floats(0.05, 0.99), bins=st.sampled_from([4, 50, 2000]))
def test_the_threshold_reaches_the_precision_on_its_own_pairs(pairs, precision, bins):
    scores = np.array([s for s, _ in pairs])
    same = np.array([m for _, m in pairs])
    try:
        cal = Calibration.from_scores(scores, same, bins=bins)
        point = cal.operating_point(precision)
    except StrongReIDError as exc:
        assert any(m in str(exc) for m in ("both matching", "do not score higher", "no score threshold"))
        return
    accepted = cal.same_person(scores, precision)
    empirical = same[accepted].mean()
    assert empirical >= precision
    assert empirical == pytest.approx(point["precision"], abs=1e-12)
    assert same[accepted].sum() / same.sum() == pytest.approx(point["recall"], abs=1e-12)
    # Every score at or above the reported threshold is accepted, every one below refused.
    assert np.array_equal(accepted, score_bins(scores, bins) >= score_bins([point["threshold"]], bins)[0])


def test_corrupt_counts_name_the_file(tmp_path):
    cal = Calibration.from_counts([0, 1, 3, 9], [7, 5, 2, 1])
    path = tmp_path / "best.calibration.json"
    cal.save(path)
    record = json.loads(path.read_text())
    record["logistic"]["slope"] = -2.0
    path.write_text(json.dumps(record))
    with pytest.raises(StrongReIDError, match=f"{path} is not a readable calibration file"):
        Calibration.load(path)
    record["logistic"]["slope"] = 2.0
    record["genuine"] = {"99": 1}
    path.write_text(json.dumps(record))
    with pytest.raises(StrongReIDError, match=f"{path} is not a readable calibration file"):
        Calibration.load(path)


# -- the "logistic" rule: the threshold where the fitted precision of the accepted pairs reaches it


def test_fitted_precision_by_hand():
    # 4 bins, centres -0.75, -0.25, 0.25, 0.75; slope 4 ln 3, intercept 0: P(same) at the
    # centres is 1/28, 1/4, 3/4, 27/28. Pairs per bin 2, 4, 4, 4. Mean P(same) of the pairs in
    # bin k and above: k=3 27/28; k=2 (3 + 27/7)/8 = 6/7; k=1 (1 + 3 + 27/7)/12 = 55/84;
    # k=0 (1/14 + 1 + 3 + 27/7)/14 = 111/196.
    cal = Calibration((1, 1, 2, 3), (1, 3, 2, 1), 4 * np.log(3), 0.0, rule="logistic")
    assert cal.fitted_precision() == pytest.approx([111 / 196, 55 / 84, 6 / 7, 27 / 28], abs=1e-12)
    # Counted: genuine at or above each bin 7, 6, 5, 3; impostor 7, 6, 3, 1.
    assert cal.counted_precision() == pytest.approx([0.5, 0.5, 5 / 8, 3 / 4], abs=1e-12)
    point = cal.operating_point(0.85)
    assert point["threshold"] == 0.0 and point["precision"] == pytest.approx(6 / 7, abs=1e-12)
    assert point["recall"] == pytest.approx(5 / 7, abs=1e-12)
    assert cal.counted(0.0) == {"precision": 5 / 8, "recall": 5 / 7, "genuine": 5, "impostor": 3}
    assert cal.counted(0.5) == {"precision": 3 / 4, "recall": 3 / 7, "genuine": 3, "impostor": 1}
    assert cal.same_person([0.1, -0.1], precision=0.85).tolist() == [True, False]
    # The counts never reach 0.85 on these pairs; the fit says the top bins do.
    counts = Calibration(cal.genuine, cal.impostor, cal.slope, cal.intercept, rule="counts")
    with pytest.raises(StrongReIDError, match="counted precision is at most 0.750"):
        counts.operating_point(0.85)
    with pytest.raises(StrongReIDError, match="fitted precision is at most 0.964"):
        cal.operating_point(0.97)


def test_fitted_precision_of_a_fitted_logistic_by_hand():
    # The two-bin fit of test_logistic_by_hand_when_the_pairs_overlap: P = 1/4 and 3/4 at the
    # centres, 4 pairs in each bin: fitted precision 1/2 from bin 0, 3/4 from bin 1.
    cal = Calibration.from_counts([1, 3], [3, 1], rule="logistic")
    assert cal.fitted_precision() == pytest.approx([0.5, 0.75], abs=1e-12)
    assert cal.operating_point(0.7) == {"threshold": 0.0, "precision": pytest.approx(0.75),
                                        "recall": 0.75}
    # No threshold above the highest pair: there the fitted precision is 0.
    empty = Calibration((1, 3, 0), (3, 1, 0), 1.0, 0.0, rule="logistic")
    assert empty.fitted_precision()[2] == 0.0


def test_the_rule_is_saved_and_checked(tmp_path):
    cal = Calibration.from_counts([0, 1, 3, 9], [7, 5, 2, 1], {"model": "m.pt"}, "logistic")
    path = tmp_path / "c.json"
    cal.save(path)
    assert json.loads(path.read_text())["rule"] == "logistic" and Calibration.load(path) == cal
    record = json.loads(path.read_text())
    del record["rule"]  # a file written before the rule was recorded used the counts
    path.write_text(json.dumps(record))
    assert Calibration.load(path).rule == "counts"
    record["rule"] = "median"
    path.write_text(json.dumps(record))
    with pytest.raises(StrongReIDError, match=f"{path} is not a readable calibration file"):
        Calibration.load(path)
    with pytest.raises(StrongReIDError, match="rule must be one of logistic, counts"):
        Calibration((1, 2), (2, 1), 1.0, 0.0, rule="median")


def test_measure_counts_the_pairs_behind_it():
    # Query A (cam 0) at 0 degrees; gallery A cam 1 at 10 (cos .985), B cam 1 at 20 (cos .94),
    # A cam 1 at 80 (cos .17). Bins of 0.5: threshold 0.5 accepts the first two.
    cal = Calibration((0, 0, 1, 3), (0, 6, 3, 1), 10.0, 0.0)
    res = measure(cal, 0.7, [_unit(0)], [_unit(10), _unit(20), _unit(80)], [1], [1, 2, 1],
                  [0], [1, 1, 1])
    assert res["threshold"] == 0.5 and res["measured"] == 0.5 and res["recall"] == 0.5
    assert (res["genuine_pairs"], res["genuine_accepted"], res["impostor_accepted"]) == (2, 1, 1)


@settings(max_examples=80, deadline=None)
@given(pairs=_pairs, precisions=st.lists(st.floats(0.05, 0.99), min_size=2, max_size=4),
       bins=st.sampled_from([4, 50, 2000]))
def test_the_fitted_threshold_is_the_lowest_and_rises_with_the_precision(pairs, precisions, bins):
    scores = np.array([s for s, _ in pairs])
    same = np.array([m for _, m in pairs])
    try:
        cal = Calibration.from_scores(scores, same, bins=bins, rule="logistic")
    except StrongReIDError as exc:
        assert "both matching" in str(exc) or "do not score higher" in str(exc)
        return
    fitted = cal.fitted_precision()
    # P(same) rises with the score, so the mean over the kept pairs rises with the threshold
    # (until no pair is left).
    occupied = np.flatnonzero(np.asarray(cal.genuine) + np.asarray(cal.impostor))
    assert np.all(np.diff(fitted[: occupied[-1] + 1]) >= -1e-12)
    last = -2.0
    for p in sorted(precisions):
        try:
            point = cal.operating_point(p)
        except StrongReIDError as exc:
            assert "no score threshold" in str(exc) and fitted.max() < p
            break
        k = int(score_bins([point["threshold"]], bins)[0])
        assert fitted[k] >= p and (k == 0 or fitted[k - 1] < p) and point["precision"] == fitted[k]
        assert point["threshold"] >= last
        last = point["threshold"]
        accepted = cal.same_person(scores, p)
        assert np.array_equal(accepted, score_bins(scores, bins) >= k)
        counted = cal.counted(point["threshold"])
        assert counted["genuine"] == same[accepted].sum()
        assert counted["impostor"] == (~same[accepted]).sum()
        assert counted["recall"] == pytest.approx(same[accepted].sum() / same.sum(), abs=1e-12)


def test_a_calibration_for_more_people_by_hand(tmp_path):
    # 4 bins as above; made on 3 people, re-targeted to 5: an impostor pair weighs
    # (5 - 1) / (3 - 1) = 2. Scores >= 0.5: 3 genuine, 1 impostor -> 3 / (3 + 2) = 0.6;
    # >= 0: 4 / (4 + 8) = 1/3.
    own = Calibration((0, 0, 1, 3), (0, 6, 3, 1), 10.0, 0.0, {"people": 3})
    more = own.for_people(5)
    assert more.impostor_weight == 2.0 and own.impostor_weight == 1.0
    assert more.counted_precision()[2:].tolist() == [pytest.approx(1 / 3), pytest.approx(0.6)]
    assert more.counted(0.5) == {"precision": pytest.approx(0.6), "recall": 0.75, "genuine": 3,
                                 "impostor": 1}
    # The probability's odds halve: logit(p) = 10 s - ln 2.
    s = np.array([-0.3, 0.0, 0.4])
    assert more.probability(s) == pytest.approx(1 / (1 + 2 * np.exp(-10 * s)))
    assert own.probability(s) == pytest.approx(1 / (1 + np.exp(-10 * s)))
    # Fitted precision of the pairs >= 0.5 (bin centre 0.75, P = 1/(1 + e^-7.5)):
    # 4 P / (4 P + 2 * 4 (1 - P)).
    p = 1 / (1 + np.exp(-7.5))
    assert more.fitted_precision()[3] == pytest.approx(4 * p / (4 * p + 8 * (1 - p)))
    assert own.fitted_precision()[3] == pytest.approx(p)
    # For its own number of people nothing moves; for fewer people the precision rises.
    assert own.for_people(3).counted_precision().tolist() == own.counted_precision().tolist()
    assert own.for_people(2).counted(0.5)["precision"] == pytest.approx(3 / (3 + 0.5))
    # The population is written and read back; a file that does not know its people cannot be
    # re-targeted, and a nonsense population is refused with the value.
    more.save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json") == more
    with pytest.raises(StrongReIDError, match="does not record how many people"):
        Calibration((0, 0, 1, 3), (0, 6, 3, 1), 10.0, 0.0).for_people(10)
    for bad in (1, 2.5, True, "9"):
        with pytest.raises(StrongReIDError, match="at least 2, got"):
            own.for_people(bad)
    record = json.loads((tmp_path / "c.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**record, "people": 0}))
    with pytest.raises(StrongReIDError, match="bad.json is not a readable calibration file"):
        Calibration.load(tmp_path / "bad.json")


@settings(max_examples=60, deadline=None)
@given(pairs=_pairs, own=st.integers(2, 50), people=st.lists(st.integers(2, 5000), min_size=2, max_size=4))
def test_more_people_never_raise_the_precision_of_a_threshold(pairs, own, people):
    scores = np.array([s for s, _ in pairs])
    same = np.array([m for _, m in pairs])
    try:
        base = Calibration.from_scores(scores, same, bins=50, source={"people": own}, rule="logistic")
    except StrongReIDError as exc:
        assert "both matching" in str(exc) or "do not score higher" in str(exc)
        return
    previous = None
    for n in sorted(people):
        cal = base.for_people(n)
        now = (cal.fitted_precision(), cal.counted_precision(), cal.probability(np.linspace(-1, 1, 9)))
        if previous is not None:
            for a, b in zip(now, previous):
                assert np.all(a <= b + 1e-12)
        previous = now


def test_re_targeted_to_a_bigger_gallery_the_precision_holds():
    # Calibrated on 40 people, measured on 400 others: the threshold made for 40 people
    # promises far more than it gives among 400; re-targeted to them it holds.
    cal = calibrate(*_split(*_people(range(0, 40), 6, 3, seed=4, spread=1.3)),
                    source={"people": 40}, rule="logistic")
    big = _split(*_people(range(1000, 1400), 6, 3, seed=5, spread=1.3))
    as_made = measure(cal.for_people(None), 0.9, *big)
    assert as_made["people"] == 400  # measure re-targets to the people it measures on
    from strongreid.evaluation.calibration import pair_histograms as hist
    g, i = hist(*big, bins=cal.bins)
    k = int(np.searchsorted(cal.edges, cal.threshold(0.9), side="right") - 1)
    naive = g[k:].sum() / (g[k:].sum() + i[k:].sum())
    assert naive < 0.8  # the threshold of 40 people, applied among 400
    assert abs(as_made["measured"] - 0.9) <= 0.03 and as_made["threshold"] > cal.threshold(0.9)


def test_a_measurement_among_more_people_than_any_threshold_serves_says_so():
    # Calibrated on 3 people; among 5 (weight 2) the counted precision tops out at 0.6.
    cal = Calibration((0, 0, 1, 3), (0, 6, 3, 1), 10.0, 0.0, {"people": 3})
    q = [_unit(0), _unit(90), _unit(180), _unit(270), _unit(45)]
    with pytest.raises(StrongReIDError, match=r"^among the 5 people measured on \(the calibration's pairs "
                                              r"came from 3\): no score threshold reaches precision 0.7"):
        measure(cal, 0.7, q, q, [1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [0] * 5, [1] * 5)
    # Among as many people as it was made on, the measurement is made as before.
    assert measure(cal, 0.7, q[:3], q[:3], [1, 2, 3], [1, 2, 3], [0] * 3, [1] * 3)["people"] == 3
