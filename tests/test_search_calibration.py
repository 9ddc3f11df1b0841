"""Same person on the search service: a model's calibration served over the wire.

A real uvicorn server on 127.0.0.1 serves a gallery of the synthetic footage with the tiny
model, whose calibration file lies beside it. The calibration is built by hand (bins and
logistic chosen here) and written and read by the real Calibration.save / load, so every
probability, threshold and decision below is computed from the Platt formula and the bin
counts, not read back from the code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("uvicorn", reason="the server needs pip install 'strongreid[search]'")
pytest.importorskip("av", reason="video ingest needs PyAV (strongreid[search])")
httpx = pytest.importorskip("httpx", reason="the wire tests need httpx (strongreid[search])")

from _search_utils import CALIBRATION_POINTS as POINTS  # noqa: E402
from _search_utils import SLOPE, footage_crops, hand_calibration, ingested_gallery, platt, serving  # noqa: E402

from strongreid.cli import main  # noqa: E402
from strongreid.deploy.extractor import FeatureExtractor  # noqa: E402
from strongreid.errors import StrongReIDError  # noqa: E402
from strongreid.evaluation.calibration import Calibration, calibrate, calibration_path  # noqa: E402
from strongreid.search.service import (  # noqa: E402
    SearchService,
    _describe_calibration,
    create_app,
    serving_calibration,
)
from strongreid.search.store import Filters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = ingested_gallery(tmp_path_factory.mktemp("calibrated"))
    root = world["root"]
    hand_calibration(root).save(calibration_path(world["model"]))  # tiny.calibration.json
    # A new extractor finds the file beside the model; the gallery's was made before it.
    calibrated = FeatureExtractor(None, world["model"], device="cpu")
    assert calibrated.calibration is not None
    with_cal = SearchService(world["store"], calibrated, world["thumbs"], str(world["model"]))
    without = SearchService(world["store"], world["extractor"], world["thumbs"], "tiny.pt",
                            calibration=False)
    with serving(create_app(with_cal)) as port, serving(create_app(without)) as port_plain:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client, \
                httpx.Client(base_url=f"http://127.0.0.1:{port_plain}", timeout=120) as plain:
            yield {**world, "client": client, "plain": plain, "service": with_cal}
    with_cal.close()
    without.close()
    world["store"].close()


def png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def raw_scores(world, key: str, k: int) -> dict[str, float]:
    """The store's own scores for a stored crop's search (what the service judges)."""
    vec = np.asarray(world["store"].get([key], with_vectors=True)[0]["vector"], np.float32)
    hits = world["store"].search(vec, k, Filters(exclude_keys=[key]))[0]
    return {h.key: h.score for h in hits}


def test_info_offers_the_precisions_the_calibration_reaches_and_no_path(world) -> None:
    r = world["client"].get("/api/info")
    assert r.status_code == 200
    cal = r.json()["calibration"]
    assert cal["precisions"] == list(POINTS) and cal["default"] == 0.95
    assert cal["max_precision"] == 0.99
    assert cal["points"] == [{"precision": p, "threshold": t, "recall": round(rec, 6)}
                             for p, (t, rec) in POINTS.items()]
    assert cal["kind"] == "labels"
    assert cal["measured"] == {"requested": 0.95, "measured": 0.94, "recall": 0.6,
                               "identities": 12}
    assert str(world["root"]) not in r.text and "labelled-people" not in r.text
    assert world["plain"].get("/api/info").json()["calibration"] is None


def test_uploads_get_platt_probabilities_and_decisions(world) -> None:
    crops, ids, _ = footage_crops(world["footage"])
    r = world["client"].post("/api/search", files={"image": ("q.png", png(crops[10]), "image/png")},
                             data={"k": "30", "precision": "0.9"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["decision"] == {"precision": 0.9, "threshold": 0.97, "recall": 0.9}
    hits = body["hits"]
    # The crop finds itself (score 1): P = 1 / (1 + e^-3) = 0.952574.
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert hits[0]["probability"] == pytest.approx(0.952574, abs=2e-5)
    for h in hits:
        # Shown to 6 digits, from the unrounded score: within the rounding of both.
        assert h["probability"] == pytest.approx(platt(h["score"]), abs=SLOPE / 4 * 5e-7 + 1e-6)
        assert h["same_person"] is (h["score"] >= 0.97), h
    marked = sum(h["same_person"] for h in hits)
    assert 0 < marked < len(hits)  # the threshold falls inside this answer
    # The timeline carries the same judgements.
    by_key = {h["key"]: h for h in hits}
    for row in body["timeline"]:
        for h in row["hits"]:
            assert h["same_person"] == by_key[h["key"]]["same_person"]


def test_an_image_body_takes_the_precision_in_its_query_string(world) -> None:
    crops, _, _ = footage_crops(world["footage"])
    form = world["client"].post("/api/search", files={"image": ("q.png", png(crops[10]), "image/png")},
                                data={"k": "30", "precision": "0.9"}).json()
    r = world["client"].post("/api/search?k=30&precision=0.9", content=png(crops[10]),
                             headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["decision"] == form["decision"] == {"precision": 0.9, "threshold": 0.97, "recall": 0.9}
    assert [(h["key"], h["same_person"]) for h in body["hits"]] == \
        [(h["key"], h["same_person"]) for h in form["hits"]]
    bad = world["client"].post("/api/search?precision=1.5", content=png(crops[10]),
                               headers={"Content-Type": "image/png"})
    assert bad.status_code == 400 and "precision" in bad.text
    plain = world["plain"].post("/api/search?precision=0.9", content=png(crops[10]),
                                headers={"Content-Type": "image/png"})
    assert plain.status_code == 409, plain.text


def test_stored_crop_queries_are_judged_on_the_stores_scores(world) -> None:
    key = world["store"].browse(1, 30)[0]["key"]
    raw = raw_scores(world, key, 25)
    assert all(abs(s - t) > 1e-7 for s in raw.values() for t in (0.97, 0.98, 0.99))
    for precision, via in ((0.99, "url"), (0.95, "form"), (None, "default")):
        data = {"key": key, "k": "25"}
        params = {}
        if via == "url":
            params["precision"] = str(precision)
        elif via == "form":
            data["precision"] = str(precision)
        body = world["client"].post("/api/search", data=data, params=params).json()
        threshold = POINTS[precision or 0.95][0]
        assert body["decision"]["precision"] == (precision or 0.95)
        assert body["decision"]["threshold"] == threshold
        assert [h["key"] for h in body["hits"]] == list(raw)
        for h in body["hits"]:
            s = raw[h["key"]]
            assert h["probability"] == pytest.approx(round(platt(s), 6), abs=1.5e-6)
            assert h["same_person"] is (s >= threshold)
    # Re-ranked hits keep their cosine score, so their probability follows it.
    rr = world["client"].post("/api/search", data={"key": key, "k": "10", "rerank": "true",
                                                   "pool": "30", "precision": "0.8"}).json()
    assert rr["reranked"] and rr["decision"]["threshold"] == 0.97
    for h in rr["hits"]:
        assert h["probability"] == pytest.approx(platt(h["score"]), abs=SLOPE / 4 * 5e-7 + 1e-6)


@pytest.mark.parametrize("value, status, words", [
    ("1.5", 400, "between 0 and 1"), ("0", 400, "between 0 and 1"), ("abc", 400, "between 0 and 1"),
    ("nan", 400, "between 0 and 1"), ("-0.2", 400, "between 0 and 1"),
    ("0.995", 400, "no score threshold reaches precision 0.995 on the calibration data (the counted precision is at most 0.990)"),
])
def test_a_precision_the_calibration_cannot_give_is_refused(world, value, status, words) -> None:
    key = world["store"].browse(1)[0]["key"]
    r = world["client"].post("/api/search", data={"key": key, "precision": value})
    assert r.status_code == status and words in r.json()["detail"], r.text


def test_precision_twice_or_without_a_calibration(world) -> None:
    key = world["store"].browse(1)[0]["key"]
    r = world["client"].post("/api/search", data={"key": key, "precision": "0.9"},
                             params={"precision": "0.95"})
    assert r.status_code == 400 and "given twice" in r.json()["detail"]
    r = world["plain"].post("/api/search", data={"key": key, "precision": "0.95"})
    detail = r.json()["detail"]
    assert r.status_code == 409 and "no same-person calibration" in detail
    assert "strongreid calibrate" in detail and str(world["root"]) not in detail
    # Without a calibration, and without asking, the answer is the one it always was.
    body = world["plain"].post("/api/search", data={"key": key, "k": "5"}).json()
    assert body["decision"] is None and len(body["hits"]) == 5
    assert not any("probability" in h or "same_person" in h for h in body["hits"])


def test_a_real_calibration_of_the_tiny_model(world) -> None:
    """`calibrate` on the footage's labelled crops: this random-weight model reaches none of the
    page's precisions, so the page offers none and the API refuses them, naming the best."""
    crops, ids, cams = footage_crops(world["footage"])
    feats = world["extractor"](crops).numpy()
    camids = np.array([int(c.removeprefix("cam")) for c in cams])
    cal = calibrate(feats, feats, ids, ids, camids, camids, source={"kind": "labels"})
    service = SearchService(world["store"], world["extractor"], world["thumbs"], "tiny.pt",
                            calibration=cal)
    try:
        with serving(create_app(service)) as port, \
                httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            info = client.get("/api/info").json()["calibration"]
            best = info["max_precision"]
            assert 0 < best < 0.8 and info["precisions"] == [] and info["default"] is None
            key = world["store"].browse(1, 10)[0]["key"]
            body = client.post("/api/search", data={"key": key, "k": "10"}).json()
            assert body["decision"] is None
            assert all("same_person" not in h for h in body["hits"])
            assert [h["probability"] for h in body["hits"]] == pytest.approx(
                [float(cal.probability(h["score"])) for h in body["hits"]], abs=1e-3)
            r = client.post("/api/search", data={"key": key, "precision": "0.9"})
            assert r.status_code == 400 and f"precision is at most {best:.3f}" in r.json()["detail"]
            # The best precision /api/info names can itself be asked for.
            r = client.post("/api/search", data={"key": key, "precision": str(best)})
            assert r.status_code == 200 and r.json()["decision"]["precision"] == best
            lower = round(best - 0.05, 2)
            r = client.post("/api/search", data={"key": key, "k": "10", "precision": str(lower)})
            assert r.status_code == 200
            t = cal.threshold(lower)
            raw = raw_scores(world, key, 10)
            assert [h["same_person"] for h in r.json()["hits"]] == [s >= t for s in raw.values()]
    finally:
        service.close()


# -- `strongreid serve` ---------------------------------------------------------------------------


def serve_args(world, *more: str) -> list[str]:
    return ["serve", "--gallery", str(world["root"] / "gallery.db"), "--model",
            str(world["model"]), "--device", "cpu", *more]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def test_serve_refuses_a_broken_or_foreign_calibration(world, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.calibration.json"
    bad.write_text('{"format": 1, "bins": 200, "score": "cosine", "genuine": {"199": 3}')
    assert main(serve_args(world, "--calibration", str(bad))) == 2
    err = one_line_error(capsys)
    assert str(bad) in err and "not a readable calibration file" in err
    assert "strongreid calibrate" in err
    # A checkpoint given as the calibration (binary, not JSON).
    assert main(serve_args(world, "--calibration", str(world["model"]))) == 2
    err = one_line_error(capsys)
    assert str(world["model"]) in err and "not a readable calibration file" in err
    # Another tool's JSON.
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"threshold": 0.5}))
    assert main(serve_args(world, "--calibration", str(foreign))) == 2
    assert str(foreign) in one_line_error(capsys)
    assert main(serve_args(world, "--calibration", str(tmp_path / "none.json"))) == 2
    assert "does not exist" in one_line_error(capsys)
    assert main(serve_args(world, "--calibration", str(bad), "--no-calibration")) == 2
    assert "contradict" in one_line_error(capsys)


def test_serve_refuses_a_broken_calibration_beside_the_model(world, tmp_path, capsys) -> None:
    model = tmp_path / "copy.pt"
    model.write_bytes(world["model"].read_bytes())
    beside = calibration_path(model)
    beside.write_text("[1, 2, 3]\n")
    args = ["serve", "--gallery", str(world["root"] / "gallery.db"), "--model", str(model),
            "--device", "cpu"]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert str(beside) in err and "--no-calibration" in err and "strongreid calibrate" in err


def test_which_calibration_serve_takes(world, tmp_path) -> None:
    beside = calibration_path(world["model"])
    cal, file = serving_calibration(str(world["model"]))
    assert file == beside and cal.slope == SLOPE
    assert serving_calibration(str(world["model"]), off=True) == (None, None)
    assert serving_calibration(str(tmp_path / "uncalibrated.pt")) == (None, None)
    # Made for another model: served, with a warning on the console.
    other = tmp_path / "other.calibration.json"
    hand_calibration(tmp_path).save(other)
    cal, file = serving_calibration("runs/x/best.pt", str(other))
    service = SearchService(world["store"], world["extractor"], world["thumbs"], "best.pt",
                            calibration=cal)
    try:
        line = _describe_calibration(service, file, "runs/x/best.pt")
        assert line.startswith(f"calibration {other}: precisions 0.8, 0.9, 0.95, 0.99")
        assert "WARNING: it was made for the model tiny.pt, not best.pt" in line
    finally:
        service.close()


def test_serve_re_targets_the_calibration_to_the_gallerys_people(world, tmp_path) -> None:
    made = hand_calibration(tmp_path)
    file = tmp_path / "made-on-12.calibration.json"
    Calibration(made.genuine, made.impostor, made.slope, made.intercept, {**made.source, "people": 12}).save(file)
    cal, _ = serving_calibration("runs/x/best.pt", str(file), people=45)
    # Among 45 people an impostor pair weighs (45 - 1) / (12 - 1) = 4 times more: the odds of
    # P(same person) fall fourfold, and the thresholds rise.
    assert cal.people == 45 and cal.impostor_weight == 4.0
    as_made, _ = serving_calibration("runs/x/best.pt", str(file))
    assert as_made.people is None
    s = np.array([0.95, 0.97, 0.99])
    odds = lambda p: p / (1 - p)  # noqa: E731
    np.testing.assert_allclose(odds(cal.probability(s)), odds(as_made.probability(s)) / 4, rtol=1e-9)
    assert cal.fitted_precision().max() < as_made.fitted_precision().max()
    service = SearchService(world["store"], world["extractor"], world["thumbs"], "best.pt",
                            calibration=cal)
    try:
        assert "among 45 people" in _describe_calibration(service, file, "runs/x/best.pt")
    finally:
        service.close()
    # A calibration that does not know its own people, --people without a calibration, or with
    # --no-calibration: one message each.
    hand_calibration(tmp_path).save(tmp_path / "old.calibration.json")
    with pytest.raises(StrongReIDError, match="does not record how many people"):
        serving_calibration("runs/x/best.pt", str(tmp_path / "old.calibration.json"), people=45)
    with pytest.raises(StrongReIDError, match="--people 45 re-targets .* does not exist"):
        serving_calibration(str(tmp_path / "uncalibrated.pt"), people=45)
    with pytest.raises(StrongReIDError, match="--people and --no-calibration contradict"):
        serving_calibration(str(world["model"]), off=True, people=45)
    # A bad --people is the flag's fault, not the file's beside the model.
    beside = tmp_path / "beside.pt"
    Calibration.load(file).save(calibration_path(str(beside)))
    with pytest.raises(StrongReIDError, match="--people must be .* at least 2, got 1") as bad:
        serving_calibration(str(beside), people=1)
    assert "lies beside" not in str(bad.value)


def test_serve_loads_the_calibration_beside_the_model(world, tmp_path) -> None:
    """`strongreid serve` as a user runs it, in its own process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-m", "strongreid", *serve_args(world, "--port", str(port))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        info = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                info = httpx.get(f"{url}/api/info", timeout=5).json()
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert info is not None, proc.communicate(timeout=10)[0] if proc.poll() is not None else ""
        assert info["calibration"]["precisions"] == list(POINTS)
        assert info["model"] == "tiny.pt" and str(world["root"]) not in json.dumps(info)
        key = world["store"].browse(1, 5)[0]["key"]
        body = httpx.post(f"{url}/api/search", data={"key": key, "k": "10", "precision": "0.99"},
                          timeout=60).json()
        raw = raw_scores(world, key, 10)
        assert [h["same_person"] for h in body["hits"]] == [s >= 0.99 for s in raw.values()]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"same person: calibration {calibration_path(world['model'])}" in out, out
    assert "precisions 0.8, 0.9, 0.95, 0.99 (at most 0.99), default 0.95" in out, out
    # `serve` says what runs the model (onnxruntime: make test installs it) and /api/info too.
    assert "forward pass: onnxruntime" in out and info["runtime"] == "onnxruntime", out


def test_info_reports_the_rules_own_highest_precision(world, tmp_path) -> None:
    # The logistic rule's fitted precision tops out below the counted one of the same pairs,
    # and below again among more people: /api/info and the refusal agree with the rule.
    made = hand_calibration(tmp_path)
    fitted = Calibration(made.genuine, made.impostor, made.slope, made.intercept,
                         {**made.source, "people": 12}, "logistic")
    for cal in (fitted, fitted.for_people(48)):
        service = SearchService(world["store"], world["extractor"], world["thumbs"], "best.pt",
                                calibration=cal)
        try:
            best = service.calibration_info()["max_precision"]
            assert best == pytest.approx(float(cal.fitted_precision().max()), abs=1e-6)
            assert best <= float(cal.fitted_precision().max())
            cal.operating_point(best)  # reachable, rounded down
            with pytest.raises(StrongReIDError, match="no score threshold reaches"):
                cal.operating_point(min(0.999, best + 0.002))
        finally:
            service.close()
    assert fitted.for_people(48).max_precision() < fitted.max_precision() < made.max_precision()
