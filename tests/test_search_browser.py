"""The search page in headless Chromium (playwright), and a bounded load test, against a real
uvicorn server on 127.0.0.1 serving a gallery of the synthetic footage.
"""

from __future__ import annotations

import csv
import http.client
import json
import shutil
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import parse_qs, urlsplit

import pytest

pytest.importorskip("pymilvus", reason="gallery search needs pip install 'strongreid[search]'")
pytest.importorskip("milvus_lite", reason="gallery search needs Milvus Lite (strongreid[search])")
pytest.importorskip("uvicorn", reason="the server needs pip install 'strongreid[search]'")
pytest.importorskip("av", reason="video ingest needs PyAV (strongreid[search])")
httpx = pytest.importorskip("httpx", reason="the load test needs httpx (strongreid[search])")

from _search_utils import (  # noqa: E402
    CALIBRATION_POINTS,
    footage_crops,
    hand_calibration,
    make_footage,
    platt,
    serving,
    tiny_model,
)

from strongreid.deploy.extractor import FeatureExtractor  # noqa: E402
from strongreid.search.ingest import ingest  # noqa: E402
from strongreid.search.service import SearchService, create_app  # noqa: E402
from strongreid.search.store import open_store  # noqa: E402

CHROMIUM = next((found for name in ("chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)
NASTY = '<img src=x onerror="window.__xss=1">cam&amp;"9"'
LOAD_QUERIES, LOAD_CONCURRENCY = 200, 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    footage = root / "footage"
    make_footage(footage)
    extractor = FeatureExtractor(None, tiny_model(root / "tiny.pt"), device="cpu")
    store = open_store(str(root / "gallery.db"))
    ingest(store, extractor, root / "gallery.thumbs", videos=[str(footage)], detections="gt",
           progress=False)
    crops, ids, cams = footage_crops(footage)
    # One crop whose camera name is markup: the page must show it as text.
    nasty = root / "nasty"
    nasty.mkdir()
    odd = next(i for i in range(len(ids)) if ids[i] != ids[0])
    crops[odd].save(nasty / "crop.png")
    with open(root / "nasty.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "camera", "timestamp"],
                                 ["crop.png", NASTY, "2026-01-05T08:00:01Z"]])
    ingest(store, extractor, root / "gallery.thumbs", crops=[str(nasty)],
           meta_csv=str(root / "nasty.csv"), progress=False)

    app = create_app(SearchService(store, extractor, root / "gallery.thumbs", "tiny.pt"))
    # The query: person 1, the middle crop of their pass through the first camera they visit.
    first = [i for i in range(len(ids)) if ids[i] == ids[0] and cams[i] == cams[0]]
    q = first[len(first) // 2]
    query = root / "query.png"
    crops[q].save(query)
    with serving(app) as port:
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "query": query,
               "query_track": int(ids[q]), "query_camera": cams[q], "store": store,
               "root": root, "extractor": extractor}
    store.close()


def raw_get(port: int, path: str) -> int:
    """GET with the path sent byte for byte (no client-side normalisation of ../)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    conn.endheaders()
    status = conn.getresponse().status
    conn.close()
    return status


def test_traversal_over_the_wire_is_404(server) -> None:
    for path in ("/thumbs/../../../../etc/passwd", "/thumbs/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                 "/thumbs/..%2f..%2f..%2fetc%2fpasswd", "/thumbs/%2fetc%2fpasswd",
                 "/thumbs//etc/passwd", "/static/..%2fservice.py", "/../../etc/passwd"):
        assert raw_get(server["port"], path) == 404, path


@contextmanager
def chromium_page(viewport: dict | None = None) -> Iterator[tuple]:
    """A headless Chromium page and the list its uncaught errors go to."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport=viewport or {"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, errors
        finally:
            browser.close()


needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="no Chromium on PATH: apt-get install -y chromium")


@needs_chromium
def test_the_page_in_chromium(server) -> None:
    with chromium_page() as (page, errors):
        page.goto(server["url"] + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)

        # Every name is text: the markup camera shows literally and never runs.
        labels = page.locator("#cameras label").all_inner_texts()
        assert NASTY in [t.strip() for t in labels]
        assert page.evaluate("window.__xss") is None

        # Upload a crop with its own camera unticked: the top hit is the same person
        # in another camera.
        page.locator(f"#cameras input[value='{server['query_camera']}']").uncheck()
        with page.expect_request(lambda r: "/api/search" in r.url and r.method == "POST") as sent:
            page.set_input_files("#image", str(server["query"]))
        # The page sends the picture as the body, the form's fields in the query string.
        request = sent.value
        assert request.headers["content-type"].startswith("image/"), request.headers
        query = parse_qs(urlsplit(request.url).query)
        assert query["k"] == ["20"] and query["rerank"] == ["false"]
        assert "cameras" in query and server["query_camera"] not in query["cameras"][0].split(",")
        page.wait_for_selector("#hits figure.hit", timeout=60_000)
        first_hits = page.locator("#hits figure.hit").evaluate_all("f => f.map(x => x.dataset.key)")
        # A file the browser types as nothing goes as a multipart form, with the same answer.
        with page.expect_response(lambda r: "/api/search" in r.url and r.request.method == "POST") as answered:
            page.set_input_files("#image", files=[{"name": "query.data", "mimeType": "",
                                                   "buffer": server["query"].read_bytes()}])
        response = answered.value
        assert response.request.headers["content-type"].startswith("multipart/form-data")
        assert "?" not in response.url and response.status == 200
        assert [h["key"] for h in response.json()["hits"]] == first_hits
        page.wait_for_selector("#status:has-text('hits in')", timeout=60_000)
        assert page.locator("#hits figure.hit").evaluate_all("f => f.map(x => x.dataset.key)") == first_hits
        top = page.locator("figure.hit[data-rank='1']")
        assert top.get_attribute("data-camera") != server["query_camera"]
        assert int(top.get_attribute("data-track")) == server["query_track"]
        cams_shown = set(page.locator("#timeline .camera-row").evaluate_all(
            "rows => rows.map(r => r.dataset.camera)"))
        assert server["query_camera"] not in cams_shown

        # Ticking the camera again changes the result: the crop finds itself first.
        page.locator(f"#cameras input[value='{server['query_camera']}']").check()
        # (Selectors, not wait_for_function: the page's CSP forbids evaluating strings.)
        page.wait_for_selector(f"figure.hit[data-rank='1'][data-camera="
                               f"{json.dumps(server['query_camera'])}]", timeout=60_000)
        assert page.locator("figure.hit[data-rank='1'] figcaption").inner_text().split()[1] == "1.000"

        # Clicking a gallery thumbnail searches with it, in the other cameras only.
        item = page.locator("#gallery button.gallery-item").nth(3)
        own = item.get_attribute("data-camera")
        item.click()
        page.wait_for_selector(f"#query-preview[src='/thumbs/{item.get_attribute('data-key')}.jpg']")
        page.wait_for_selector("#status:has-text('hits in')", timeout=60_000)
        shown = page.locator("#hits figure.hit").evaluate_all("f => f.map(x => x.dataset.camera)")
        assert shown and own not in shown

        # Every thumbnail on the page decoded.
        images = page.locator("img:visible").evaluate_all(
            "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.getAttribute('src')])")
        assert len(images) > 10
        assert all(ok and w > 0 for ok, w, _ in images), images
        assert errors == []


@needs_chromium
def test_ranked_hits_are_all_visible_without_overlap(server, tmp_path) -> None:
    """Top-20: every hit image has its own box, inside the page, and is what shows at its
    centre (not covered by another card); rank 1 comes first. Screenshot in tmp_path."""
    with chromium_page({"width": 1100, "height": 800}) as (page, errors):
        page.goto(server["url"] + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        page.fill("#k", "20")
        page.set_input_files("#image", str(server["query"]))
        page.wait_for_selector("#hits li:nth-child(20) figure.hit img", timeout=60_000)
        page.wait_for_selector("#status:has-text('hits in')", timeout=60_000)
        ranks = page.locator("#hits figure.hit").evaluate_all("f => f.map(x => +x.dataset.rank)")
        assert ranks == list(range(1, 21))
        boxes = []
        for rank in ranks:
            img = page.locator(f"#hits figure.hit[data-rank='{rank}'] img")
            img.scroll_into_view_if_needed()
            assert img.is_visible()
            # The element drawn at the image's centre is the image itself.
            assert img.evaluate("i => { const r = i.getBoundingClientRect();"
                                " return document.elementFromPoint(r.x + r.width / 2,"
                                " r.y + r.height / 2) === i; }"), rank
            box = img.evaluate("i => { const r = i.getBoundingClientRect();"
                               " return [r.left + scrollX, r.top + scrollY, r.width, r.height]; }")
            assert box[2] > 20 and box[3] > 50
            boxes.append(box)
        for i, (x, y, w, h) in enumerate(boxes):
            for j, (x2, y2, w2, h2) in enumerate(boxes[i + 1:], i + 1):
                overlap = min(x + w, x2 + w2) - max(x, x2) > 0 and min(y + h, y2 + h2) - max(y, y2) > 0
                assert not overlap, (i + 1, j + 1, boxes[i], boxes[j])
        # Rank 1 is the first card, top left of the grid.
        cards = page.locator("#hits figure.hit").evaluate_all(
            "f => f.map(x => { const r = x.getBoundingClientRect(); return [r.left, r.top]; })")
        assert cards[0] == [min(c[0] for c in cards), min(c[1] for c in cards)]
        # The timeline: one lane per camera, one marker per hit; a marker selects its card.
        markers = page.locator("#timeline .marker")
        assert markers.count() == 20
        page.locator("#timeline .marker[data-rank='1']").click()
        assert "selected" in page.locator("figure.hit[data-rank='1']").get_attribute("class")
        page.evaluate("() => window.scrollTo(0, 0)")
        shot = tmp_path / "search-page.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot: {shot}")
        assert shot.stat().st_size > 10_000 and errors == []


@needs_chromium
def test_the_page_asks_for_the_token_once_and_shows_ingest_progress(server, tmp_path) -> None:
    from strongreid.search.security import TokenAuth, create_token

    token = create_token(tmp_path / "tokens.txt", "browser")
    drop = tmp_path / "drop"
    make_footage(drop / "day2", seed=7, people=1, frames=20)
    service = SearchService(server["store"], server["extractor"], server["root"] / "gallery.thumbs")
    app = create_app(service, auth=TokenAuth.from_file(tmp_path / "tokens.txt"), ingest_root=drop)
    with serving(app) as port, chromium_page() as (page, errors):
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#login:not([hidden])", timeout=60_000)
        assert page.locator("#gallery img").count() == 0
        page.fill("#token", "not-the-token")
        page.click("#login button[type=submit]")
        page.wait_for_selector("#status.error:has-text('not valid')")
        page.fill("#token", token)
        page.click("#login button[type=submit]")
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        assert page.locator("#login").is_hidden()
        # Asked once: a reload (a new visit in this tab) goes straight to the gallery.
        page.reload()
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        assert page.locator("#login").is_hidden()
        page.wait_for_load_state("networkidle")
        loaded = page.locator("#gallery img").evaluate_all(
            "i => i.map(x => x.complete && x.naturalWidth > 0)")
        assert loaded and all(loaded)  # the thumbnails come with the cookie too
        before = int(page.locator("#info").inner_text().split()[0])
        page.fill("#ingest-folder", "day2")
        page.select_option("#ingest-detections", "gt")
        page.click("#ingest button[type=submit]")
        page.wait_for_selector("#ingest-status[data-state='done']", timeout=120_000)
        assert page.locator("#ingest-progress").is_visible()
        text = page.locator("#ingest-status").inner_text()
        added = int(text.split(",")[1].split()[0])
        assert added > 0 and text.startswith(f"done: {added} / {added} crops")
        page.wait_for_selector(f"#info:has-text('{before + added} crops')", timeout=30_000)
        page.click("#logout")
        page.wait_for_selector("#login:not([hidden])", timeout=60_000)
        assert errors == []
    service.close()


@needs_chromium
def test_the_page_marks_same_person_hits_at_the_chosen_precision(server, tmp_path) -> None:
    """With a calibration, exactly the hits whose P(same person) passes the chosen precision's
    threshold are marked; the choice comes from the address, then from the last one made.
    Screenshot in tmp_path."""
    service = SearchService(server["store"], server["extractor"], server["root"] / "gallery.thumbs",
                            "tiny.pt", calibration=hand_calibration(tmp_path))

    def cards(page) -> list[dict]:
        return page.locator("#hits figure.hit").evaluate_all(
            "f => f.map(x => ({key: x.dataset.key, p: +x.dataset.probability,"
            " marked: x.classList.contains('same-person'), badge: !!x.querySelector('.badge'),"
            " shown: x.querySelector('.probability').textContent}))")

    def check(page, precision: float) -> int:
        threshold = CALIBRATION_POINTS[precision][0]
        # Platt is increasing: a score passes the threshold exactly when its probability
        # passes the probability of the threshold.
        passing = platt(threshold)
        shown = cards(page)
        assert len(shown) == 20
        assert all(abs(c["p"] - passing) > 2e-5 for c in shown)  # no hit on the edge
        for c in shown:
            assert c["marked"] is c["badge"] is (c["p"] >= passing), (precision, c)
            assert c["shown"] == f"{100 * c['p']:.1f}%"
        marked = sum(c["marked"] for c in shown)
        assert page.locator("#timeline .marker.same-person").count() == marked
        assert f", {marked} same person at precision {precision}" in page.locator("#status").inner_text()
        return marked

    with serving(create_app(service)) as port, chromium_page() as (page, errors):
        url = f"http://127.0.0.1:{port}/"
        page.goto(url + "?precision=0.9")
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        assert page.locator("#same-person").is_visible()
        assert page.locator("#precision option").evaluate_all("o => o.map(x => x.value)") == \
            ["0.8", "0.9", "0.95", "0.99"]
        assert page.input_value("#precision") == "0.9"
        page.set_input_files("#image", str(server["query"]))
        page.wait_for_selector("#status:has-text('same person at precision')", timeout=60_000)
        at_90 = check(page, 0.9)

        page.select_option("#precision", "0.99")
        page.wait_for_selector("#status:has-text('same person at precision 0.99')", timeout=60_000)
        at_99 = check(page, 0.99)
        assert 0 < at_99 < at_90 < 20  # the two thresholds fall inside these 20 hits
        assert page.url.endswith("/?precision=0.99")
        page.evaluate("() => window.scrollTo(0, 0)")
        shot = tmp_path / "same-person.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot: {shot}")
        assert shot.stat().st_size > 10_000

        # Remembered: a new visit without ?precision= comes back with the last choice.
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        assert page.input_value("#precision") == "0.99"
        assert errors == []
    service.close()

    # Without a calibration the choice is not offered and no card is marked.
    with serving(create_app(SearchService(server["store"], server["extractor"],
                                          server["root"] / "gallery.thumbs", "tiny.pt",
                                          calibration=False))) as port, \
            chromium_page() as (page, errors):
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        assert page.locator("#same-person").is_hidden()
        page.set_input_files("#image", str(server["query"]))
        page.wait_for_selector("#status:has-text('hits in')", timeout=60_000)
        assert "same person" not in page.locator("#status").inner_text()
        assert page.locator("#hits figure.hit").count() == 20
        assert page.locator("#hits .same-person, #hits .probability, #hits .badge").count() == 0
        assert errors == []


def test_load_200_queries_8_concurrent(server) -> None:
    """Bounded: 200 queries, 8 at a time, every 10th an upload; reports p50/p95, no errors."""
    keys = [r["key"] for r in server["store"].browse(50)]
    upload = server["query"].read_bytes()
    latencies: list[float] = []
    failures: list[str] = []

    with httpx.Client(base_url=server["url"], timeout=120) as client:
        def one(i: int) -> None:
            t0 = time.perf_counter()
            if i % 10 == 0:
                r = client.post("/api/search", files={"image": ("q.png", upload, "image/png")},
                                data={"k": "10"})
            else:
                r = client.post("/api/search", data={"key": keys[i % len(keys)], "k": "10"})
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200 or len(r.json()["hits"]) != 10:
                failures.append(f"{i}: {r.status_code} {r.text[:200]}")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(LOAD_CONCURRENCY) as pool:
            list(pool.map(one, range(LOAD_QUERIES)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    print(f"\nload: {LOAD_QUERIES} queries, {LOAD_CONCURRENCY} concurrent, {wall:.1f} s "
          f"({LOAD_QUERIES / wall:.1f} q/s): p50 {q[49] * 1000:.1f} ms, p95 {q[94] * 1000:.1f} ms, "
          f"errors {len(failures)}")
    assert failures == [] and len(latencies) == LOAD_QUERIES
