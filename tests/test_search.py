"""Gallery search: ingest into Milvus Lite, filtered search, and the JSON API (FastAPI's client).

Everything is real: PyAV decodes the synthetic footage, FeatureExtractor embeds the crops with
a tiny ResNet-18, Milvus Lite stores them in a file, FastAPI serves them.
"""

from __future__ import annotations

import csv
import io
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="gallery search needs pip install 'strongreid[search]'")
pytest.importorskip("milvus_lite", reason="gallery search needs Milvus Lite (strongreid[search])")
pytest.importorskip("fastapi", reason="the service needs pip install 'strongreid[search]'")
pytest.importorskip("av", reason="video ingest needs PyAV (strongreid[search])")

from _search_utils import CAMS, FPS, footage_crops, ingested_gallery, make_footage  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from strongreid.cli import main  # noqa: E402
from strongreid.errors import DatasetError, StrongReIDError  # noqa: E402
from strongreid.search.ingest import find_sequences, ingest, thumb_path  # noqa: E402
from strongreid.search.service import SearchService, create_app, decode_upload  # noqa: E402
from strongreid.search.store import Filters, MilvusStore, StoreError, quote  # noqa: E402

START = 1767600000.0  # 2026-01-05T08:00:00Z, the footage's first frame


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = ingested_gallery(tmp_path_factory.mktemp("search"))
    yield world
    world["store"].close()


@pytest.fixture(scope="module")
def client(world):
    service = SearchService(world["store"], world["extractor"], world["thumbs"], "tiny.pt")
    # The service answers loopback Host names only (DNS rebinding): TestClient's default
    # "testserver" would be a 403.
    with TestClient(create_app(service, max_upload=200_000), base_url="http://127.0.0.1") as c:
        yield c


def all_rows(store: MilvusStore) -> list[dict]:
    rows = store.browse(10_000)
    return store.get([r["key"] for r in rows], with_vectors=True)


# -- ingest -------------------------------------------------------------------------------------


def test_ingest_stores_every_detection_with_its_metadata(world) -> None:
    seqs = find_sequences(world["footage"], "gt")
    n_rows = sum(len(s.rows) for s in seqs)
    store = world["store"]
    assert world["stats"].added == n_rows == store.count()
    rows = all_rows(store)
    assert len({r["key"] for r in rows}) == n_rows
    # One row checked field by field against its gt.txt line.
    seq = seqs[1]
    frame, mot, left, top, w, h, _ = seq.rows[3]
    match = [r for r in rows if r["camera"] == seq.name and r["frame"] == frame and r["track"] == mot]
    assert len(match) == 1
    r = match[0]
    assert (r["left"], r["top"], r["width"], r["height"]) == (round(left), round(top), round(w), round(h))
    assert r["timestamp"] == pytest.approx(START + (frame - 1) / FPS)
    assert r["video"] == f"{seq.name}/video.mp4" and r["pid"] == -1
    assert len(r["vector"]) == world["extractor"].feat_dim == store.dim
    for r in rows:
        with Image.open(thumb_path(world["thumbs"], r["key"])) as t:
            assert t.height == 128


def test_rerun_skips_everything_before_decoding(world) -> None:
    calls = []

    def embed(crops):
        calls.append(len(crops))
        return world["extractor"](crops)

    stats = ingest(world["store"], embed, world["thumbs"], videos=[str(world["footage"])],
                   detections="gt", progress=False)
    assert (stats.added, stats.skipped, calls) == (0, world["stats"].added, [])
    assert world["store"].count() == world["stats"].added


def test_an_interrupted_ingest_resumes_without_duplicates(world, tmp_path) -> None:
    store = MilvusStore(str(tmp_path / "g.db"))
    batches = []

    def failing(crops):
        if len(batches) == 2:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of a run
        batches.append(len(crops))
        return world["extractor"](crops)

    with pytest.raises(KeyboardInterrupt):
        ingest(store, failing, tmp_path / "t", videos=[str(world["footage"])], detections="gt",
               batch_size=16, progress=False)
    stored = sum(batches)  # the two batches written before the interruption
    assert stored >= 16 and store.count() == stored
    stats = ingest(store, world["extractor"], tmp_path / "t", videos=[str(world["footage"])],
                   detections="gt", batch_size=16, progress=False)
    total = world["stats"].added
    assert (stats.skipped, stats.added, store.count()) == (stored, total - stored, total)
    store.close()


def test_crop_folders_with_market_names_or_a_csv(world, tmp_path) -> None:
    crops, ids, cams = footage_crops(world["footage"])
    folder = tmp_path / "crops"
    folder.mkdir()
    names = []
    for i in (0, 5, 40):
        cam = int(cams[i][-1])
        name = f"{ids[i]:04d}_c{cam}s1_{100 + i:06d}_01.png"
        crops[i].save(folder / name)
        names.append(name)
    shutil.copy(folder / names[0], folder / "copy_of_first.png")  # same bytes: one row
    store = MilvusStore(str(tmp_path / "crops.db"))
    with pytest.raises(StrongReIDError, match="copy_of_first.png: the camera cannot be read"):
        ingest(store, world["extractor"], tmp_path / "t", crops=[str(folder)], progress=False)
    (folder / "copy_of_first.png").unlink()
    stats = ingest(store, world["extractor"], tmp_path / "t", crops=[str(folder)], progress=False)
    assert stats.added == 3
    row = [r for r in store.browse(10) if r["source"] == names[2]][0]
    assert (row["camera"], row["pid"], row["frame"]) == (f"c{cams[40][-1]}", ids[40], 140)
    assert row["timestamp"] == pytest.approx(140 / 25)

    shutil.copy(folder / names[0], folder / "copy_of_first.png")
    meta = tmp_path / "meta.csv"
    with open(meta, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "camera", "timestamp", "track"])
        for i, name in enumerate([*names, "copy_of_first.png"]):
            w.writerow([name, f"door <{i}>", f"2026-01-05T09:00:0{i}Z", 7])
    store2 = MilvusStore(str(tmp_path / "csv.db"))
    stats = ingest(store2, world["extractor"], tmp_path / "t2", crops=[str(folder)],
                   meta_csv=str(meta), progress=False)
    assert (stats.added, stats.skipped, store2.count()) == (3, 1, 3)
    times = sorted(r["timestamp"] for r in store2.browse(10))
    assert times == [START + 3600, START + 3601, START + 3602]
    # A row without a camera could never be filtered or grouped: refused, naming the row.
    with open(meta, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "camera", "timestamp"])
        for i, name in enumerate([*names, "copy_of_first.png"]):
            w.writerow([name, "" if i == 1 else "door", f"2026-01-05T09:00:0{i}Z"])
    with pytest.raises(DatasetError, match=f"row {names[1]}: the camera is empty; every row needs one"):
        ingest(store2, world["extractor"], tmp_path / "t2", crops=[str(folder)],
               meta_csv=str(meta), progress=False)
    assert store2.count() == 3
    store.close()
    store2.close()


# -- the store ----------------------------------------------------------------------------------


def test_flat_search_is_exact_and_filters_apply(world) -> None:
    store = world["store"]
    rows = all_rows(store)
    g = np.array([r["vector"] for r in rows], np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = g[7]
    sims = g @ q
    hits = store.search(q, 10)[0]
    assert [h.key for h in hits] == [rows[i]["key"] for i in np.argsort(-sims, kind="stable")[:10]]
    np.testing.assert_allclose([h.score for h in hits], np.sort(sims)[::-1][:10], atol=1e-5)

    cams = ["cam2", "cam3"]
    t0, t1 = START + 1.0, START + 3.0
    hits = store.search(q, 50, Filters(cameras=cams, start=t0, end=t1))[0]
    allowed = [i for i, r in enumerate(rows) if r["camera"] in cams and t0 <= r["timestamp"] <= t1]
    assert {h.key for h in hits} == {rows[i]["key"] for i in allowed}
    assert all(h.meta["camera"] in cams and t0 <= h.meta["timestamp"] <= t1 for h in hits)
    assert store.search(q, 5, Filters(videos=["cam1/video.mp4"]))[0][0].meta["camera"] == "cam1"
    assert store.search(q, 5, Filters(cameras=['cam1" or camera != "'])) == [[]]


def test_a_crop_finds_its_person_in_other_cameras(world) -> None:
    """Top-1 in the other cameras is the same person for most crops (chance is 1 in 4)."""
    store = world["store"]
    rows = all_rows(store)
    right = 0
    for r in rows:
        others = [f"cam{c}" for c in range(1, CAMS + 1) if f"cam{c}" != r["camera"]]
        top = store.search(np.asarray(r["vector"]), 1, Filters(cameras=others))[0][0]
        right += top.meta["track"] == r["track"]
    assert right / len(rows) > 0.8


def test_store_errors(world, tmp_path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        MilvusStore(str(tmp_path / "missing.db"), create=False)
    with pytest.raises(StoreError, match="must end with .db"):
        MilvusStore(str(tmp_path / "gallery.sqlite"))
    with pytest.raises(StoreError, match="holds 512-dimensional features but the model gives 8"):
        world["store"].open(8)
    with pytest.raises(StoreError, match="control characters"):
        quote("a\nb")
    assert quote('a"b\\c') == '"a\\"b\\\\c"'


# -- the API ------------------------------------------------------------------------------------


def test_info_and_gallery(client) -> None:
    info = client.get("/api/info").json()
    assert info["cameras"] == ["cam1", "cam2", "cam3"] and info["dim"] == 512
    assert info["start"] >= START
    items = client.get("/api/gallery", params={"limit": 5}).json()["items"]
    assert len(items) == 5 and items == sorted(items, key=lambda i: i["timestamp"])
    assert client.get(items[0]["thumb"]).headers["content-type"] == "image/jpeg"
    only = client.get("/api/gallery", params={"limit": 500, "camera": "cam2"}).json()["items"]
    assert only and {i["camera"] for i in only} == {"cam2"}
    assert client.get(f"/api/items/{items[0]['key']}").json()["frame"] == items[0]["frame"]
    assert client.get("/openapi.json").json()["paths"]["/api/search"]["post"]


def test_search_an_upload_and_a_stored_crop(client, world) -> None:
    crops, ids, cams = footage_crops(world["footage"])
    r = client.post("/api/search", files={"image": ("q.png", png_bytes(crops[10]), "image/png")},
                    data={"k": "8"})
    assert r.status_code == 200, r.text
    body = r.json()
    scores = [h["score"] for h in body["hits"]]
    assert len(scores) == 8 and scores == sorted(scores, reverse=True)
    # The upload is a stored crop's pixels (PNG, lossless): it finds itself first.
    assert body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert body["hits"][0]["track"] == ids[10] and body["hits"][0]["camera"] == cams[10]
    grouped = [h["key"] for row in body["timeline"] for h in row["hits"]]
    assert sorted(grouped) == sorted(h["key"] for h in body["hits"])
    for row in body["timeline"]:
        assert [h["timestamp"] for h in row["hits"]] == sorted(h["timestamp"] for h in row["hits"])

    key = body["hits"][0]["key"]
    r = client.post("/api/search", data={"key": key, "k": "10", "exclude_camera": "true"}).json()
    assert r["query"]["kind"] == "key" and r["hits"]
    assert all(h["camera"] != cams[10] and h["key"] != key for h in r["hits"])
    r = client.post("/api/search", data={"key": key, "k": "50", "cameras": "cam1,cam3",
                                         "start": "2026-01-05T08:00:01Z", "end": str(START + 3)})
    assert {h["camera"] for h in r.json()["hits"]} <= {"cam1", "cam3"}
    assert all(START + 1 <= h["timestamp"] <= START + 3 for h in r.json()["hits"])


def test_rerank_reorders_the_pool(client, world) -> None:
    key = world["store"].browse(1, 20)[0]["key"]
    plain = client.post("/api/search", data={"key": key, "k": "10", "pool": "30"}).json()
    rr = client.post("/api/search", data={"key": key, "k": "10", "pool": "30",
                                          "rerank": "true"}).json()
    assert rr["reranked"] and not plain["reranked"]
    d = [h["rerank_distance"] for h in rr["hits"]]
    assert len(d) == 10 and d == sorted(d)
    pool = client.post("/api/search", data={"key": key, "k": "30"}).json()
    assert {h["key"] for h in rr["hits"]} <= {h["key"] for h in pool["hits"]}


def test_bad_requests_get_a_message(client, world) -> None:
    def post(**kw):
        return client.post("/api/search", **kw)

    big = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    r = post(files={"image": ("big.png", png_bytes(Image.fromarray(big)), "image/png")})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = post(files={"image": ("x.png", b"#!/bin/sh\nrm -rf /\n", "image/png")})
    assert r.status_code == 400 and "not an image" in r.json()["detail"]
    crop = footage_crops(world["footage"])[0][0]
    r = post(files={"image": ("t.png", png_bytes(crop)[:200], "image/png")})  # truncated
    assert r.status_code == 400
    gif = io.BytesIO()
    crop.save(gif, "GIF")
    r = post(files={"image": ("a.gif", gif.getvalue(), "image/gif")})
    assert r.status_code == 400 and "GIF" in r.json()["detail"]
    assert post(data={"k": "5"}).status_code == 400
    assert post(data={"key": "0" * 40}).status_code == 404
    assert post(data={"key": "../../etc/passwd"}).status_code == 404
    assert post(data={"key": world["store"].browse(1)[0]["key"], "k": "0"}).status_code == 400
    assert post(data={"key": world["store"].browse(1)[0]["key"], "start": "noon"}).status_code == 400
    backwards = post(data={"key": world["store"].browse(1)[0]["key"], "start": "100", "end": "5"})
    assert backwards.status_code == 400
    assert backwards.json()["detail"] == "start (100) is after end (5): give the earlier time as start"
    assert client.get("/api/items/zz").status_code == 404


def test_a_decompression_bomb_is_refused() -> None:
    # A 1-colour PNG of 5000 x 5000 pixels is a few kilobytes; refused before decoding.
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(StrongReIDError, match="at most 16777216 pixels") as info:
        decode_upload(buf.getvalue(), max_bytes=10**7)
    assert info.value.status == 413


@pytest.mark.parametrize("path", [
    "/thumbs/../../../../etc/passwd", "/thumbs/..%2F..%2F..%2Fetc%2Fpasswd",
    "/thumbs/%2e%2e/%2e%2e/etc/passwd", "/thumbs//etc/passwd", "/thumbs/%2Fetc%2Fpasswd",
    "/thumbs/" + "a" * 40 + ".jpg", "/thumbs/../gallery.db", "/static/../service.py",
    "/static/%2e%2e%2fservice.py", "/static/index.html",
])
def test_no_path_outside_the_thumbnails_is_served(client, path) -> None:
    assert client.get(path).status_code == 404


def test_thumbnail_names_carry_no_path(client, world) -> None:
    key = world["store"].browse(1)[0]["key"]
    assert client.get(f"/thumbs/{key}.jpg").status_code == 200
    for bad in (f"{key[:2]}/{key}.jpg", f"{key}.jpg/..", f"{key}.JPG", f"%2e%2e/{key}.jpg"):
        assert client.get(f"/thumbs/{bad}").status_code == 404, bad


def test_the_page_treats_values_as_text(client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    js = client.get("/static/app.js").text
    # Values reach the page through textContent / setAttribute only.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js


def test_queries_while_an_ingest_runs_lose_nothing(world, client, tmp_path) -> None:
    more = tmp_path / "more"
    make_footage(more, seed=5, people=2)
    store = world["store"]
    before = store.count()
    expected = sum(len(s.rows) for s in find_sequences(more, "gt"))
    keys = [r["key"] for r in store.browse(40)]
    errors: list[str] = []
    done = threading.Event()

    def run_ingest():
        try:
            ingest(store, world["extractor"], world["thumbs"], videos=[str(more)],
                   detections="gt", batch_size=8, progress=False)
        except Exception as exc:  # surfaced below
            errors.append(repr(exc))
        finally:
            done.set()

    def query(i: int) -> int:
        r = client.post("/api/search", data={"key": keys[i % len(keys)], "k": "5"})
        return r.status_code

    t = threading.Thread(target=run_ingest)
    t.start()
    codes = []
    with ThreadPoolExecutor(8) as pool:
        while not done.is_set() or len(codes) < 40:
            codes += list(pool.map(query, range(len(codes), len(codes) + 8)))
    t.join()
    assert errors == [] and set(codes) == {200}
    assert store.count() == before + expected


# -- the command line ---------------------------------------------------------------------------


def test_cli_ingest_twice_then_the_demo_command(world, tmp_path, capsys) -> None:
    gallery = tmp_path / "cli.db"
    args = ["gallery", "ingest", "--gallery", str(gallery), "--model", str(world["model"]),
            "--videos", str(world["footage"]), "--detections", "det", "--frame-step", "2",
            "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    second = capsys.readouterr().out
    assert second.startswith(f"0 crops added, {first.split()[0]} already stored")
    assert (tmp_path / "cli.thumbs").is_dir()
    assert main(["serve", "--gallery", str(tmp_path / "none.db"), "--model",
                 str(world["model"])]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["demo", "search", "--model", str(tmp_path / "nope.pt")]) == 2
    assert "make demo" in capsys.readouterr().err
    demo = ["demo", "search", "--model", str(world["model"]), "--footage", str(world["footage"]),
            "--gallery", str(tmp_path / "demo.db"), "--device", "cpu"]
    assert main(demo) == 0
    out = capsys.readouterr().out
    assert f"strongreid serve --gallery {tmp_path / 'demo.db'} --model {world['model']}" in out


# -- parsers and quoting, property-tested ---------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from strongreid.search.ingest import read_mot  # noqa: E402

_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF, exclude_categories=("Cs",)),
                min_size=1, max_size=30)


@pytest.fixture(scope="module")
def names_store(tmp_path_factory):
    store = MilvusStore(str(tmp_path_factory.mktemp("names") / "names.db"))
    store.open(4)
    yield store
    store.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=_TEXT)
def test_any_camera_name_filters_exactly_itself(names_store, name) -> None:
    key = format(abs(hash(name)), "040x")[:40]
    names_store.upsert([{"key": key, "vector": [1.0, 0.0, 0.0, 0.0], "camera": name},
                        {"key": "f" * 40, "vector": [1.0, 0.0, 0.0, 0.0], "camera": name + "x"}])
    hits = names_store.search(np.array([1.0, 0, 0, 0]), 10, Filters(cameras=[name]))[0]
    assert {h.meta["camera"] for h in hits} == {name}


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(1, 10**6), st.integers(-1, 10**4),
                               *[st.floats(-1e4, 1e4, allow_nan=False) for _ in range(4)],
                               st.sampled_from([0.0, 0.5, 1.0])), max_size=20),
       gt=st.booleans())
def test_read_mot_round_trips(tmp_path_factory, rows, gt) -> None:
    path = tmp_path_factory.mktemp("mot") / ("gt.txt" if gt else "det.txt")
    path.write_text("".join(f"{f},{i},{a!r},{b!r},{c!r},{d!r},{s!r},1,1\n"
                            for f, i, a, b, c, d, s in rows))
    expected = [r for r in rows if not (gt and r[6] == 0)]  # gt's consider flag 0 is left out
    assert read_mot(path) == expected
