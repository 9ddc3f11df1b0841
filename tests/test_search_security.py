"""The search service as a hostile or careless client meets it: over the wire, against a real
uvicorn server on 127.0.0.1 serving a gallery of the synthetic footage.

Tokens and sessions, the Host allow-list, exact keys, thumbnails that are not regular files,
chunked and oversized uploads, phone photos (MPO, EXIF orientation), what /api/info tells,
batched forward passes, and ingest while serving.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import select
import socket
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("pymilvus", reason="gallery search needs pip install 'strongreid[search]'")
pytest.importorskip("milvus_lite", reason="gallery search needs Milvus Lite (strongreid[search])")
pytest.importorskip("uvicorn", reason="the server needs pip install 'strongreid[search]'")
pytest.importorskip("av", reason="video ingest needs PyAV (strongreid[search])")
httpx = pytest.importorskip("httpx", reason="the tests' client is httpx (strongreid[search])")

from _search_utils import footage_crops, ingested_gallery, make_footage, serving  # noqa: E402
from PIL import Image  # noqa: E402

from strongreid.cli import build_parser, main  # noqa: E402
from strongreid.errors import StrongReIDError  # noqa: E402
from strongreid.search.ingest import find_sequences, thumb_path  # noqa: E402
from strongreid.search.security import (  # noqa: E402
    COOKIE,
    MAX_SESSIONS,
    SESSION_SECONDS,
    SharedSessions,
    TokenAuth,
    allowed_hosts,
    create_token,
    hash_token,
    host_name,
    read_auth_file,
)
from strongreid.search.service import (  # noqa: E402
    Batcher,
    OnnxFeatures,
    PreparedUpload,
    SearchService,
    TracedFeatures,
    create_app,
    decode_upload,
    runtime_name,
    serving_runtime,
)

MAX_UPLOAD = 200_000


def image_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = ingested_gallery(tmp_path_factory.mktemp("secure"))
    root, footage, store = world["root"], world["footage"], world["store"]
    crops, ids, cams = footage_crops(footage)
    drop = root / "drop"  # the ingest root: footage arrives here while the server runs
    drop.mkdir()
    auth_file = root / "tokens.txt"
    token = create_token(auth_file, "tester")
    # 50 ms of batching window: the concurrency test's queries reliably meet in a batch.
    service = SearchService(store, world["extractor"], world["thumbs"], str(world["model"]),
                            max_upload=MAX_UPLOAD, batch_wait_ms=50)
    app = create_app(service, auth=TokenAuth.from_file(auth_file), ingest_root=drop,
                     allowed_hosts=allowed_hosts(["gallery.example"]))
    with serving(app) as port:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=120,
                          headers={"Authorization": f"Bearer {token}"}) as client:
            yield {**world, "port": port, "url": url, "token": token, "client": client,
                   "service": service, "crops": crops, "ids": ids, "cams": cams, "drop": drop}
    service.close()
    store.close()


def raw(port: int, method: str, path: str, headers: dict[str, str] | None = None,
        body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """A request sent byte for byte (no client-side normalisation, any Host)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    headers = {"Host": f"127.0.0.1:{port}", **(headers or {})}
    for k, v in headers.items():
        if v is not None:
            conn.putheader(k, v)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    conn.close()
    return out


# -- tokens -------------------------------------------------------------------------------------


def test_every_gallery_route_needs_a_token(world) -> None:
    port, token = world["port"], world["token"]
    key = world["store"].browse(1)[0]["key"]
    guarded = [("GET", "/api/info"), ("GET", "/api/gallery"), ("GET", f"/api/items/{key}"),
               ("GET", f"/thumbs/{key}.jpg"), ("GET", "/openapi.json"), ("GET", "/api/ingest"),
               ("POST", "/api/search")]
    for method, path in guarded:
        for auth in (None, "Bearer wrong-token", f"Basic {token}", "Bearer "):
            status, headers, _ = raw(port, method, path, {"Authorization": auth},
                                     b"" if method == "POST" else None)
            assert status == 401, (method, path, auth)
            assert headers["www-authenticate"].startswith("Bearer")
        status, _, _ = raw(port, method, path, {"Authorization": f"Bearer {token}"},
                           b"" if method == "POST" else None)
        assert status in (200, 400), (method, path)  # 400: the empty search names no query
    # The page shell, its script and style carry no gallery data: public, so it can log in.
    for path in ("/", "/static/app.js", "/static/style.css"):
        assert raw(port, "GET", path)[0] == 200


def test_the_token_file_holds_hashes_only(tmp_path) -> None:
    path = tmp_path / "tokens.txt"
    first, second = create_token(path, "alice"), create_token(path, "bob")
    text = path.read_text()
    assert first not in text and second not in text and len(first) >= 43
    assert read_auth_file(path) == [("alice", hash_token(first)), ("bob", hash_token(second))]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    auth = TokenAuth.from_file(path)
    assert (auth.check_token(first), auth.check_token(second), auth.check_token(first + "x")) \
        == ("alice", "bob", None)
    path.write_text(f"{first} plain\n")  # a token pasted in clear is refused, not trusted
    with pytest.raises(StrongReIDError, match="line 1: expected 'sha256:<64 hex digits> name'"):
        read_auth_file(path)
    with pytest.raises(StrongReIDError, match="strongreid gallery token --auth-file"):
        read_auth_file(tmp_path / "missing.txt")


def test_the_page_logs_in_once_with_a_cookie(world) -> None:
    port, token = world["port"], world["token"]
    status, headers, _ = raw(port, "GET", f"/?token={token}")
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and token not in cookie
    for attr in ("HttpOnly", "SameSite=Strict", "Path=/"):
        assert attr in cookie
    session = cookie.split(";")[0]
    assert raw(port, "GET", "/api/info", {"Cookie": session})[0] == 200
    assert raw(port, "GET", "/?token=nope")[0] == 401
    assert raw(port, "GET", "/api/info", {"Cookie": f"{COOKIE}=forged"})[0] == 401
    # The page's login box: a form post, then the same cookie rules.
    with httpx.Client(base_url=world["url"]) as browser:
        assert browser.post("/api/login", data={"token": "wrong"}).status_code == 401
        r = browser.post("/api/login", data={"token": token})
        assert r.status_code == 200 and r.json()["token_name"] == "tester"
        assert browser.get("/api/info").status_code == 200
        assert browser.post("/api/logout").status_code == 200
        browser.cookies.clear()
        assert raw(port, "GET", "/api/info", {"Cookie": session})[0] == 200
    assert raw(port, "POST", "/api/logout", {"Cookie": session}, b"")[0] == 200
    assert raw(port, "GET", "/api/info", {"Cookie": session})[0] == 401


def test_only_allowed_host_names_are_served(world) -> None:
    port, bearer = world["port"], {"Authorization": f"Bearer {world['token']}"}
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "gallery.example",
                 f"GALLERY.example.:{port}"):
        assert raw(port, "GET", "/api/info", {**bearer, "Host": host})[0] == 200, host
    # What a DNS-rebinding page sends: its own name, resolved to 127.0.0.1.
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example",
                 "localhost.evil.example", "gallery.example.evil"):
        status, _, body = raw(port, "GET", "/api/info", {**bearer, "Host": host})
        assert status == 403 and b"--allowed-host" in body, host
    for host in ("", "a b", "::1", "x@127.0.0.1", "127.0.0.1:80x", "[::1"):
        assert raw(port, "GET", "/", {"Host": host})[0] == 400, host
    # A form posted from another site's page is refused even with the session cookie.
    status, _, _ = raw(port, "POST", "/api/search", {**bearer, "Origin": "http://evil.example"},
                       b"")
    assert status == 403
    assert host_name("[::1]:8000") == "::1" and host_name("Example.COM.") == "example.com"


def test_serve_refuses_a_public_address_without_tokens(world, capsys) -> None:
    args = ["serve", "--gallery", str(world["root"] / "gallery.db"), "--model",
            str(world["model"]), "--host", "0.0.0.0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "refusing to serve on 0.0.0.0 without authentication" in err
    assert "strongreid gallery token --auth-file" in err
    # --token keeps meaning the Milvus server's token; --milvus-token is its clear name.
    parser = build_parser()
    for flag in ("--token", "--milvus-token"):
        ns = parser.parse_args(["serve", "--gallery", "g.db", "--model", "m.pt", flag, "root:Milvus"])
        assert ns.token == "root:Milvus" and ns.auth_file is None
    assert main(["gallery", "token", "--auth-file", str(world["root"] / "t2.txt"),
                 "--name", "cli"]) == 0
    printed = capsys.readouterr().out.strip()
    assert read_auth_file(world["root"] / "t2.txt") == [("cli", hash_token(printed))]


# -- keys and thumbnails ------------------------------------------------------------------------


def test_keys_match_exactly(world) -> None:
    client, port = world["client"], world["port"]
    key = world["store"].browse(1)[0]["key"]
    bearer = {"Authorization": f"Bearer {world['token']}"}
    assert client.get(f"/api/items/{key}").status_code == 200
    for path in (f"/api/items/{key}%0a", f"/api/items/{key}%0A%0A", f"/api/items/{key}%00",
                 f"/api/items/{key.upper()}", f"/thumbs/{key}.jpg%0a"):
        assert raw(port, "GET", path, bearer)[0] == 404, path
    for bad in (key + "\n", key + "\r\n", " " + key, key[:-1]):
        r = client.post("/api/search", data={"key": bad, "k": "5"})
        assert r.status_code == 404 and "40 hexadecimal digits" in r.json()["detail"], repr(bad)


def test_thumbnails_are_regular_files_inside_the_folder(world, tmp_path) -> None:
    client, thumbs = world["client"], world["thumbs"]
    key = world["store"].browse(1)[0]["key"]
    assert client.get(f"/thumbs/{key}.jpg").status_code == 200
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"\xff\xd8 not for you")
    # 1. a symlinked thumbnail; 2. a symlinked fan-out folder; 3. a folder named like a
    # thumbnail; 4. a FIFO (reading it would hang a worker); 5. a hard-to-see relative link.
    k1, k2, k3, k4, k5 = ("a1" + "0" * 38, "b2" + "0" * 38, "c3" + "0" * 38, "d4" + "0" * 38,
                          "e5" + "0" * 38)
    thumb_path(thumbs, k1).parent.mkdir(parents=True, exist_ok=True)
    thumb_path(thumbs, k1).symlink_to(secret)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / f"{k2}.jpg").write_bytes(b"\xff\xd8 outside")
    (thumbs / "b2").symlink_to(outside, target_is_directory=True)
    thumb_path(thumbs, k3).mkdir(parents=True)
    thumb_path(thumbs, k4).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(thumb_path(thumbs, k4))
    thumb_path(thumbs, k5).parent.mkdir(parents=True, exist_ok=True)
    thumb_path(thumbs, k5).symlink_to(os.path.relpath(secret, thumb_path(thumbs, k5).parent))
    for k in (k1, k2, k3, k4, k5):
        r = client.get(f"/thumbs/{k}.jpg")
        assert r.status_code == 404 and b"for you" not in r.content and b"outside" not in r.content


# -- uploads ------------------------------------------------------------------------------------


def test_a_chunked_upload_is_stopped_at_the_limit(world) -> None:
    """No Content-Length: the server counts while reading and answers 413 at the limit."""
    port, token = world["port"], world["token"]
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    boundary = "xyz"
    head = (f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n")
    sock.sendall(head.encode())
    chunk = os.urandom(64 * 1024)
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent, answer = 0, b""
    budget = 300 * 1024 * 1024  # what the client would send if nobody stopped it
    sock.setblocking(False)
    while sent < budget:
        readable, writable, _ = select.select([sock], [sock], [], 10)
        if readable:
            break
        if writable:
            try:
                sent += sock.send(framed)
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
    sock.setblocking(True)
    try:
        while b"\r\n\r\n" not in answer and (part := sock.recv(65536)):
            answer += part
    except ConnectionResetError:
        pass
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # Stopped long before the 300 MiB the client had: the limit plus socket buffers.
    assert sent < 32 * 1024 * 1024


def test_a_declared_oversized_body_is_refused_before_reading(world) -> None:
    status, _, body = raw(world["port"], "POST", "/api/search",
                          {"Authorization": f"Bearer {world['token']}",
                           "Content-Length": str(10**9), "Content-Type": "multipart/form-data"})
    assert status == 413 and b"limit" in body


def test_huge_pixel_counts_are_decoded_a_few_at_a_time_and_shrunk(world) -> None:
    """8 concurrent 4096 x 4096 PNGs (a few KB each): all answered, each shrunk to 768 pixels."""
    data = image_bytes(Image.new("RGB", (4096, 4096), (90, 120, 150)), optimize=True)
    assert len(data) < MAX_UPLOAD

    def post(_):
        return world["client"].post("/api/search", files={"image": ("big.png", data, "image/png")},
                                    data={"k": "3"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    assert [r.status_code for r in answers] == [200] * 8
    assert all(r.json()["query"]["size"] == [768, 768] for r in answers)


def test_a_raw_image_body_is_searched_like_a_form_upload(world) -> None:
    """POST /api/search with the crop as the body, the parameters in the query string."""
    crops, client, port, token = world["crops"], world["client"], world["port"], world["token"]
    data = image_bytes(crops[10])
    params = {"k": "8", "cameras": "cam1,cam3", "exclude_camera": "false"}
    form = client.post("/api/search", files={"image": ("q.png", data, "image/png")}, data=params)
    body = client.post("/api/search", params=params, content=data,
                       headers={"Content-Type": "image/png"})
    assert form.status_code == body.status_code == 200, body.text
    hits = body.json()["hits"]
    assert len(hits) == 8 and {h["camera"] for h in hits} <= {"cam1", "cam3"}
    assert hits == form.json()["hits"] and body.json()["query"] == form.json()["query"]
    assert body.headers["content-security-policy"].startswith("default-src 'none'")
    # The same guards as every request: a token, an allowed Host, the same origin.
    plain = {"Content-Type": "image/png"}
    assert raw(port, "POST", "/api/search?k=3", plain, data)[0] == 401
    bearer = {**plain, "Authorization": f"Bearer {token}"}
    assert raw(port, "POST", "/api/search?k=3", {**bearer, "Host": "evil.example"}, data)[0] == 403
    assert raw(port, "POST", "/api/search?k=3", {**bearer, "Origin": "http://evil.example"},
               data)[0] == 403
    status, _, answer = raw(port, "POST", "/api/search?k=3", bearer, data)
    assert status == 200 and len(json.loads(answer)["hits"]) == 3


def test_a_raw_body_is_counted_checked_and_explained(world) -> None:
    client, crop = world["client"], world["crops"][0]

    def post(content, query: str = "", mime: str = "image/jpeg"):
        return client.post(f"/api/search{query}", content=content,
                           headers={"Content-Type": mime})

    # Over the upload limit but under the request's: counted by the upload path itself.
    r = post(os.urandom(MAX_UPLOAD + 1000))
    assert r.status_code == 413 and f"limit is {MAX_UPLOAD}" in r.json()["detail"]
    # Chunked (no Content-Length): counted while it arrives.
    r = post(iter([os.urandom(64 * 1024)] * 4))
    assert r.status_code == 413 and f"limit is {MAX_UPLOAD}" in r.json()["detail"]
    gif = io.BytesIO()
    crop.save(gif, "GIF")
    r = post(gif.getvalue(), mime="image/gif")
    assert r.status_code == 400 and "GIF" in r.json()["detail"]
    assert post(b"", mime="image/png").status_code == 400
    png = image_bytes(crop)
    for query, words in [("?k=abc", "k must be a whole number"), ("?k=0", "k must be between"),
                         ("?pool=1", "pool must be between 2 and 1000"),
                         ("?rerank=maybe", "rerank must be true or false"),
                         ("?start=noon", "neither seconds nor ISO-8601"),
                         (f"?key={'0' * 40}", "unknown parameter(s) key")]:
        r = post(png, query, "image/png")
        assert r.status_code == 400 and words in r.json()["detail"], (query, r.text)
    r = post(png, "?k=2&rerank=true&pool=20", "image/png")
    assert r.status_code == 200 and r.json()["reranked"] and len(r.json()["hits"]) == 2


def search_keys(client, data: bytes, name: str, mime: str, k: int = 10) -> list[str]:
    r = client.post("/api/search", files={"image": (name, data, mime)}, data={"k": str(k)})
    assert r.status_code == 200, r.text
    return [h["key"] for h in r.json()["hits"]]


def test_a_phone_mpo_is_searched_as_its_first_picture(world) -> None:
    crops, client = world["crops"], world["client"]
    first, second = crops[10].resize((64, 128)), crops[40].resize((64, 128))
    mpo = image_bytes(first, "MPO", save_all=True, append_images=[second], quality=90)
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    as_mpo = search_keys(client, mpo, "phone.jpg", "image/jpeg")
    assert as_mpo == search_keys(client, image_bytes(first, "JPEG", quality=90), "a.jpg",
                                 "image/jpeg")
    assert as_mpo != search_keys(client, image_bytes(second, "JPEG", quality=90), "b.jpg",
                                 "image/jpeg")


def test_exif_orientation_is_applied(world) -> None:
    """A phone stores a portrait photo sideways with EXIF orientation 6 (rotate 90 clockwise)."""
    crop, client = world["crops"][10], world["client"]
    upright = search_keys(client, image_bytes(crop), "up.png", "image/png")
    sideways = crop.transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = search_keys(client, image_bytes(sideways, exif=exif.tobytes()), "s.png", "image/png")
    assert tagged == upright
    # Without the tag, the sideways picture is another query: the test can tell the difference.
    assert search_keys(client, image_bytes(sideways), "raw.png", "image/png") != upright


# -- what the API says --------------------------------------------------------------------------


def test_info_reports_the_limits_and_no_paths(world) -> None:
    client = world["client"]
    info = client.get("/api/info")
    assert info.status_code == 200
    body = info.json()
    assert body["max_upload"] == MAX_UPLOAD and body["model"] == "tiny.pt"
    assert body["auth"] is True and body["ingest"] is True
    assert str(world["root"]) not in info.text
    # No Swagger UI: its assets would come from a CDN the CSP blocks. The schema stays.
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404, path
    assert "/api/search" in client.get("/openapi.json").json()["paths"]


# -- batching -----------------------------------------------------------------------------------


def test_concurrent_uploads_share_forward_passes_and_get_their_own_answers(world) -> None:
    crops, ids, cams, client = world["crops"], world["ids"], world["cams"], world["client"]
    batcher = world["service"].batcher
    picks = list(range(0, len(crops), max(1, len(crops) // 16)))[:16]
    before_batches, before_images = batcher.batches, batcher.images

    def post(i: int) -> dict:
        r = client.post("/api/search", files={"image": ("q.png", image_bytes(crops[i]), "image/png")},
                        data={"k": "1"})
        assert r.status_code == 200, r.text
        return r.json()["hits"][0]

    with ThreadPoolExecutor(16) as pool:
        tops = list(pool.map(post, picks))
    # Each upload is a stored crop's pixels: it finds itself, whatever batch it rode in.
    for i, top in zip(picks, tops):
        assert (top["track"], top["camera"]) == (ids[i], cams[i])
        assert top["score"] == pytest.approx(1.0, abs=1e-4)
    assert batcher.images - before_images == len(picks)
    assert batcher.batches - before_batches < len(picks)



class _Recorder:
    """An embed that records its batches: each input is a number, its feature that number.
    An input of 0 holds its pass until `release` is set (`entered` says it began)."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, items: list) -> np.ndarray:
        self.batches.append(list(items))
        if 0.0 in items:
            self.entered.set()
            assert self.release.wait(30)
        return np.asarray([[x] for x in items], np.float32)


def _ask(batcher: Batcher, item: object) -> Future:
    """batcher(item) on a thread of its own."""
    done: Future = Future()
    threading.Thread(target=lambda: done.set_result(batcher(item)), daemon=True).start()
    return done


def _queued(batcher: Batcher, n: int) -> None:
    deadline = time.monotonic() + 30
    while len(batcher._waiting) < n:
        assert time.monotonic() < deadline, "the query never reached the queue"
        time.sleep(0.005)


# A window of a minute: a test that passes did not wait for it (it would time out first).
MINUTE = 60_000


def test_a_query_alone_is_embedded_without_waiting_for_the_window() -> None:
    embed = _Recorder()
    batcher = Batcher(embed, threading.Lock(), max_batch=16, wait_ms=MINUTE)
    try:
        assert _ask(batcher, 1.0).result(timeout=20)[0] == 1.0
        assert embed.batches == [[1.0]]
    finally:
        batcher.close()


def test_a_pass_waits_for_announced_queries_and_takes_them_in_one_batch() -> None:
    embed = _Recorder()
    batcher = Batcher(embed, threading.Lock(), max_batch=16, wait_ms=MINUTE)
    try:
        tickets = [batcher.expect() for _ in range(3)]
        assert batcher.coming == 3
        first = _ask(batcher, PreparedUpload((1, 1), 1.0, tickets[0]))
        _queued(batcher, 1)
        time.sleep(0.2)
        assert not first.done() and embed.batches == []  # two more are on their way
        second = _ask(batcher, PreparedUpload((1, 1), 2.0, tickets[1]))
        _queued(batcher, 2)
        # The third upload failed to decode: withdrawn, so nothing is left to wait for.
        batcher.withdraw(tickets[2])
        assert [f.result(timeout=20)[0] for f in (first, second)] == [1.0, 2.0]
        assert embed.batches == [[1.0, 2.0]] and batcher.coming == 0
        batcher.withdraw(tickets[0])  # a ticket already used: nothing happens
        assert batcher.coming == 0
        # While a pass runs, queries queue up and the next pass takes them together.
        running = _ask(batcher, 0.0)
        assert embed.entered.wait(20)
        queued = [_ask(batcher, x) for x in (3.0, 4.0)]
        _queued(batcher, 2)
        embed.release.set()
        assert [f.result(timeout=20)[0] for f in (running, *queued)] == [0.0, 3.0, 4.0]
        assert embed.batches[1:] == [[0.0], [3.0, 4.0]]
    finally:
        batcher.close()


def test_a_ticket_whose_query_never_comes_stops_holding_the_queue() -> None:
    embed = _Recorder()
    batcher = Batcher(embed, threading.Lock(), max_batch=16, wait_ms=MINUTE)
    batcher.TICKET_S = 0.3  # the request died between its decode and its search
    try:
        batcher.expect()
        t0 = time.monotonic()
        assert _ask(batcher, 7.0).result(timeout=20)[0] == 7.0
        assert time.monotonic() - t0 >= 0.3 and batcher.coming == 0
    finally:
        batcher.close()


def test_a_closed_batcher_finishes_its_queue_and_refuses_new_queries() -> None:
    embed = _Recorder()
    batcher = Batcher(embed, threading.Lock(), max_batch=2, wait_ms=MINUTE)
    running = _ask(batcher, 0.0)  # holds its pass: the next three queue behind it
    assert embed.entered.wait(20)
    asked = [_ask(batcher, x) for x in (1.0, 2.0, 3.0)]
    _queued(batcher, 3)
    batcher.close()
    embed.release.set()
    assert [f.result(timeout=20)[0] for f in (running, *asked)] == [0.0, 1.0, 2.0, 3.0]
    assert [len(b) for b in embed.batches] == [1, 2, 1]
    with pytest.raises(StrongReIDError, match="shutting down"):
        batcher(4.0)


def test_uploads_refused_after_their_decode_leave_no_announced_query(world) -> None:
    client, service = world["client"], world["service"]
    png = image_bytes(world["crops"][3])
    # Decoded, then refused by the search (k out of range): the ticket is withdrawn.
    r = client.post("/api/search?k=0", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 400 and "k must be" in r.text
    # Not an image: the failed decode withdraws it.
    r = client.post("/api/search", content=b"not an image", headers={"Content-Type": "image/png"})
    assert r.status_code == 400
    r = client.post("/api/search", files={"image": ("q.png", b"junk", "image/png")})
    assert r.status_code == 400
    assert service.batcher.coming == 0


def test_queries_run_on_onnxruntime_with_the_eager_models_features(world) -> None:
    service, extractor, crops = world["service"], world["extractor"], world["crops"]
    # By default (--runtime auto) the forward pass runs on onnxruntime where it is installed
    # (make test installs it)...
    assert isinstance(service.embed, OnnxFeatures) and service.embed.extractor is extractor
    assert service.runtime == "onnxruntime" and world["client"].get("/api/info").json()["runtime"] == "onnxruntime"
    # ...whose features are the eager model's within float rounding, at any batch size.
    assert service.embed.difference <= 1e-6
    for batch in (crops[:1], crops[:5], crops[:40]):
        np.testing.assert_allclose(service.embed(batch).numpy(), extractor(batch).numpy(), rtol=0, atol=1e-6)
    # An upload's answer over the wire ranks as the eager feature does, with its scores.
    r = world["client"].post("/api/search", data={"k": "5"},
                             files={"image": ("q.png", image_bytes(crops[7]), "image/png")})
    assert r.status_code == 200, r.text
    want = world["store"].search(extractor([crops[7]]).numpy()[0], 5)[0]
    got = r.json()["hits"]
    assert [h["key"] for h in got] == [h.key for h in want]
    assert [h["score"] for h in got] == pytest.approx([h.score for h in want], abs=2e-6)


def test_the_torch_runtime_serves_the_traced_graph_bitwise(world) -> None:
    extractor, crops = world["extractor"], world["crops"]
    service = SearchService(world["store"], extractor, world["thumbs"], runtime="torch")
    try:
        # The traced forward pass (no GIL while it computes), bitwise the eager model's.
        assert isinstance(service.embed, TracedFeatures) and service.runtime == "torchscript"
        for batch in (crops[:1], crops[:5], crops[:40]):
            assert np.array_equal(service.embed(batch).numpy(), extractor(batch).numpy())
        answer = service.search(crops[7], k=5)
        want = world["store"].search(extractor([crops[7]]).numpy()[0], 5)[0]
        assert [(h["key"], h["score"]) for h in answer["hits"]] == [(h.key, round(h.score, 6)) for h in want]
    finally:
        service.close()


def test_uploads_reach_the_batcher_preprocessed_with_the_same_features(world) -> None:
    import asyncio

    extractor, crops, store = world["extractor"], world["crops"], world["store"]
    service = SearchService(store, extractor, world["thumbs"], runtime="torch")
    seen: list[list] = []
    try:
        data = image_bytes(crops[7])
        prepared = asyncio.run(service.decode(data))
        # The decode threads made the model's input: the extractor's own preprocessing, bitwise.
        assert isinstance(prepared, PreparedUpload) and prepared.size == crops[7].size
        want = extractor.preprocess([decode_upload(data)])[0]
        assert prepared.input.dtype == torch.float32 and torch.equal(prepared.input, want)
        # The batcher hands the forward pass that tensor, not the picture...
        embed = service.batcher.embed
        service.batcher.embed = lambda items: (seen.append(list(items)), embed(items))[1]
        from_prepared = service.search(prepared, k=5)
        assert len(seen) == 1 and all(isinstance(x, torch.Tensor) for x in seen[0])
        # ...and the answer is the one a decoded picture gets, bitwise (the traced graph).
        from_image = service.search(decode_upload(data), k=5)
        assert isinstance(seen[1][0], Image.Image)
        assert [(h["key"], h["score"]) for h in from_prepared["hits"]] == \
            [(h["key"], h["score"]) for h in from_image["hits"]]
        assert from_prepared["query"] == from_image["query"] == {"kind": "upload", "size": list(crops[7].size)}
    finally:
        service.close()
    # A model the service cannot look inside (a plain callable) gets decoded pictures.
    plain = SearchService(store, lambda images: np.ones((len(images), store.dim), np.float32),
                          world["thumbs"], runtime="torch")
    try:
        upload = asyncio.run(plain.decode(data))
        assert isinstance(upload, PreparedUpload) and isinstance(upload.input, Image.Image)
        assert plain.batcher.coming == 1  # announced, not yet searched
        assert plain.search(upload, k=3)["query"]["size"] == list(crops[7].size)
        assert plain.batcher.coming == 0
    finally:
        plain.close()


def test_what_cannot_be_traced_is_served_eagerly(world) -> None:
    def embed(images):
        return np.zeros((len(images), 4), np.float32)

    assert TracedFeatures.wrap(embed) is embed
    # 'auto' falls back to torch for what onnxruntime cannot run; asked for by name, it says why.
    assert serving_runtime(embed, "auto") is embed and runtime_name(embed) == "eager"
    with pytest.raises(StrongReIDError, match="only a FeatureExtractor"):
        serving_runtime(embed, "onnxruntime")
    with pytest.raises(StrongReIDError, match="--runtime must be one of auto, onnxruntime, torch"):
        serving_runtime(embed, "tensorrt")


def test_a_graph_onnxruntime_cannot_run_is_named_or_passed_over(world, monkeypatch) -> None:
    import strongreid.deploy.runtimes as runtimes

    def broken(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation\nmore")

    monkeypatch.setattr(runtimes, "run_onnx", broken)
    with pytest.raises(StrongReIDError, match=r"^onnxruntime cannot run this model's graph: RuntimeError: "
                                              r"\[ONNXRuntimeError\] : 9 : NOT_IMPLEMENTED : Could not find an implementation$"):
        serving_runtime(world["extractor"], "onnxruntime")
    assert isinstance(serving_runtime(world["extractor"], "auto"), TracedFeatures)


def test_a_missing_onnxruntime_is_named_or_passed_over(world, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(StrongReIDError, match=r"needs onnxruntime: pip install 'strongreid\[search\]'"):
        serving_runtime(world["extractor"], "onnxruntime")
    assert isinstance(serving_runtime(world["extractor"], "auto"), TracedFeatures)


# -- ingest while serving -----------------------------------------------------------------------


def test_footage_is_ingested_while_serving_with_progress(world) -> None:
    client, store = world["client"], world["store"]
    make_footage(world["drop"] / "more", seed=5, people=2)
    expected = sum(len(s.rows) for s in find_sequences(world["drop"] / "more", "gt"))
    before = store.count()
    for bad in ({"videos": ["../footage"]}, {"videos": ["/etc"]}, {"videos": []},
                {"videos": ["more"], "detections": "all"}, {"videos": ["more"], "frame_step": 0},
                {"videos": ["nowhere"]}):
        r = client.post("/api/ingest", json=bad)
        assert r.status_code == 400, bad
    (world["drop"] / "link").symlink_to(world["footage"], target_is_directory=True)
    assert client.post("/api/ingest", json={"videos": ["link"]}).status_code == 400
    assert httpx.post(world["url"] + "/api/ingest", json={"videos": ["more"]}).status_code == 401

    r = client.post("/api/ingest", json={"videos": ["more"], "detections": "gt"})
    assert r.status_code == 202
    job = r.json()["id"]
    seen = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        status = client.get(f"/api/ingest/{job}").json()
        seen.append(status["done"])
        if status["state"] in ("done", "failed"):
            break
        time.sleep(0.2)
    assert status["state"] == "done", status
    assert status["added"] == expected == status["total"] == status["done"]
    assert seen == sorted(seen)
    assert store.count() == before + expected
    assert client.get("/api/ingest").json()["jobs"][0]["id"] == job
    assert client.get("/api/ingest/0000").status_code == 404


def test_ingest_over_http_needs_tokens(world, tmp_path) -> None:
    service = SearchService(world["store"], world["extractor"], world["thumbs"])
    with pytest.raises(StrongReIDError, match="--ingest-root .* needs --auth-file"):
        create_app(service, ingest_root=tmp_path)
    with serving(create_app(service)) as port:  # loopback, no tokens, no ingest
        status, _, body = raw(port, "POST", "/api/ingest", {"Content-Type": "application/json"},
                              b'{"videos": ["x"]}')
        assert status == 404 and b"--ingest-root" in body
        assert raw(port, "GET", "/api/info")[0] == 200
    service.close()


def test_sessions_shared_through_a_file_are_known_to_every_process(tmp_path, monkeypatch) -> None:
    import strongreid.search.security as security

    hashes = [("a", hash_token("tok"))]
    path = tmp_path / "sessions.db"
    one, two = TokenAuth(hashes, SharedSessions(path)), TokenAuth(hashes, SharedSessions(path))
    sid = one.new_session()
    assert two.check_session(sid) and one.check_session(sid)
    assert not two.check_session(sid + "x") and not two.check_session("")
    # Only the id's hash is stored, never the id.
    assert sid.encode() not in path.read_bytes()
    two.end_session(sid)
    assert not one.check_session(sid)
    # Sessions expire on the wall clock, which every process shares.
    late = one.new_session()
    now = time.time()
    monkeypatch.setattr(security.time, "time", lambda: now + SESSION_SECONDS + 1)
    assert not two.check_session(late)
    # The table holds at most MAX_SESSIONS: the oldest go first.
    monkeypatch.setattr(security, "MAX_SESSIONS", 3)
    made = [one.new_session() for _ in range(5)]
    assert [two.check_session(m) for m in made] == [False, False, True, True, True]
    assert MAX_SESSIONS == 10_000
