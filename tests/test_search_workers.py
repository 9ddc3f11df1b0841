"""`strongreid serve --workers N`: several server processes on one port over one gallery.

A real `python -m strongreid serve --workers 2 --auth-file tokens.txt` subprocess on 127.0.0.1,
queried over the wire (form and raw-body uploads from concurrent clients, each connection new so
that both workers take requests), a row written by another process while it serves, the Host
allow-list and the tokens in every worker, page sessions shared by the workers, and the
combinations it refuses.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("uvicorn", reason="the server needs pip install 'strongreid[search]'")
pytest.importorskip("av", reason="video ingest needs PyAV (strongreid[search])")
httpx = pytest.importorskip("httpx", reason="the tests' client is httpx (strongreid[search])")

from _search_utils import footage_crops, ingested_gallery  # noqa: E402
from PIL import Image  # noqa: E402

from strongreid.cli import main  # noqa: E402
from strongreid.search.security import create_token  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def spawned_children(pid: int) -> list[int]:
    """Worker processes of the server: its children started by multiprocessing's spawn."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/cmdline", "rb") as c:
                    if b"spawn_main" in c.read():
                        out.append(int(child))
    return out


TOKEN: dict[str, str] = {}


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN['value']}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    world = ingested_gallery(tmp_path_factory.mktemp("workers"))
    tokens = world["root"] / "tokens.txt"
    TOKEN["value"] = create_token(tokens, "tests")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "strongreid", "serve", "--gallery",
                             str(world["root"] / "gallery.db"), "--model", str(world["model"]),
                             "--device", "cpu", "--port", str(port), "--workers", "2",
                             "--batch-wait-ms", "20", "--auth-file", str(tokens)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        # Ready when both workers answer: each opens the gallery and loads the model itself.
        while len(spawned_children(proc.pid)) < 2 or \
                any(_info(url) is None for _ in range(6)):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the workers did not start within 240 s"
            time.sleep(0.3)
        yield {**world, "url": url, "proc": proc}
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
        world["store"].close()
    assert proc.returncode == 0, out


def _info(url: str) -> dict | None:
    try:
        r = httpx.get(url + "/api/info", headers=auth(), timeout=30)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def test_workers_answer_concurrent_uploads_each_with_its_own_crop(served) -> None:
    crops, ids, cams = footage_crops(served["footage"])
    assert len(spawned_children(served["proc"].pid)) == 2
    picks = list(range(0, len(crops), max(1, len(crops) // 16)))[:16]

    def post(i: int) -> dict:
        data = png(crops[i])
        # A new connection per request: the kernel hands connections to both workers.
        if i % 2:
            r = httpx.post(served["url"] + "/api/search", params={"k": "1"}, content=data,
                           headers={"Content-Type": "image/png", **auth()}, timeout=120)
        else:
            r = httpx.post(served["url"] + "/api/search", data={"k": "1"}, headers=auth(),
                           files={"image": ("q.png", data, "image/png")}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["hits"][0]

    with ThreadPoolExecutor(8) as pool:
        tops = list(pool.map(post, picks))
    for i, top in zip(picks, tops):
        assert (top["track"], top["camera"]) == (ids[i], cams[i])
        assert top["score"] == pytest.approx(1.0, abs=1e-4)


def test_every_worker_sees_rows_written_while_it_serves(served) -> None:
    store, url = served["store"], served["url"]
    before = store.count()
    row = store.get([store.browse(1)[0]["key"]], with_vectors=True)[0]
    store.upsert([{**row, "key": "f" * 40, "camera": "cam9"}])  # another process writes
    for _ in range(12):
        assert _info(url)["count"] == before + 1
        # The new row is in each worker's index: the only cam9 hit of its twin's search.
        r = httpx.post(url + "/api/search", data={"key": row["key"], "k": "5", "cameras": "cam9"},
                       headers=auth(), timeout=60)
        assert r.status_code == 200, r.text
        assert [(h["key"], h["score"]) for h in r.json()["hits"]] == [("f" * 40, 1.0)]


def test_the_host_allow_list_holds_in_every_worker(served) -> None:
    for _ in range(8):
        r = httpx.get(served["url"] + "/api/info", headers={"Host": "evil.example", **auth()},
                      timeout=30)
        assert r.status_code == 403
        assert r.headers["content-security-policy"].startswith("default-src 'none'")


def test_every_worker_wants_a_token_and_knows_every_page_session(served) -> None:
    url = served["url"]
    # Each request on a new connection: the kernel spreads them over both workers.
    for _ in range(8):
        assert httpx.get(url + "/api/info", timeout=30).status_code == 401
        wrong = {"Authorization": "Bearer " + "x" * 43}
        assert httpx.get(url + "/api/info", headers=wrong, timeout=30).status_code == 401
    # The page logs in once (one worker makes the session)...
    r = httpx.post(url + "/api/login", data={"token": TOKEN["value"]}, timeout=30)
    assert r.status_code == 200, r.text
    sid = r.cookies.get("strongreid_session")
    assert sid and TOKEN["value"] not in r.headers["set-cookie"]
    cookie = {"Cookie": f"strongreid_session={sid}"}
    # ...and every worker honours it.
    for _ in range(12):
        assert httpx.get(url + "/api/info", headers=cookie, timeout=30).status_code == 200
    # A logout on one worker ends it on all.
    assert httpx.post(url + "/api/logout", headers=cookie, timeout=30).status_code == 200
    for _ in range(12):
        assert httpx.get(url + "/api/info", headers=cookie, timeout=30).status_code == 401
    # The sessions' file lives in a private folder of the server's (not beside the gallery).
    assert not list(served["root"].glob("**/sessions.db"))


def test_workers_refuse_what_lives_in_one_process(served, tmp_path, capsys) -> None:
    base = ["serve", "--gallery", str(served["root"] / "gallery.db"), "--model",
            str(served["model"]), "--workers", "2"]
    assert main([*base, "--ingest-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot be combined with --ingest-root" in err and "ingest jobs live in one process" in err
    assert main([*base[:-1], "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
