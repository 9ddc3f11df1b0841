"""The gallery stores: the embedded FaissStore (SQLite + faiss) and MilvusStore, against brute force.

Exact filters, index parameters that reach the index, replaced keys, durability under kill -9,
a second process writing, the Milvus Lite -> gallery.db migration, and paging: a property test
on the stores and a real uvicorn server on 127.0.0.1 paged through over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strongreid.cli import main
from strongreid.search.faiss_store import EXACT_BELOW, FaissStore
from strongreid.search.store import Filters, MilvusStore, StoreError, open_store

ROOT = Path(__file__).resolve().parents[1]
DIM = 16
CAMS = ["north", "south", "lobby"]


def key(i: int) -> str:
    return f"{i:040x}"


def clustered(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """n/4 identities, 4 noisy views each: neighbours that mean something."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 4), dim)).astype(np.float32)
    return centres[np.arange(n) // 4 % len(centres)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)


def rows_of(x: np.ndarray, start: int = 0) -> list[dict]:
    # Timestamps repeat (ties) so an order needs its tie-breakers.
    return [{"key": key(start + i), "vector": v, "camera": CAMS[(start + i) % 3],
             "timestamp": float((start + i) // 5), "video": f"v{(start + i) % 2}",
             "frame": start + i} for i, v in enumerate(x)]


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_force(x: np.ndarray, rows: list[dict], q: np.ndarray, k: int, f: Filters) -> list[str]:
    ok = np.array([(not f.cameras or r["camera"] in f.cameras)
                   and (f.start is None or r["timestamp"] >= f.start)
                   and (f.end is None or r["timestamp"] <= f.end)
                   and r["key"] not in f.exclude_keys for r in rows])
    s = unit(x) @ unit(q)
    s[~ok] = -np.inf
    order = np.argsort(-s, kind="stable")[:min(k, int(ok.sum()))]
    return [rows[i]["key"] for i in order]


SMALL = {"FLAT": {}, "IVF_FLAT": {"nlist": 4}, "HNSW": {"M": 8, "efConstruction": 40}}


@pytest.fixture(params=list(SMALL))
def filled(request, tmp_path):
    """A 600-row gallery per index type (IVF_FLAT trains at 160 rows: it is really IVF)."""
    x = clustered(600)
    rows = rows_of(x)
    store = FaissStore(str(tmp_path / "g.db"), index_type=request.param,
                       index_params=SMALL[request.param])
    store.open(DIM)
    for i in range(0, 600, 100):
        store.upsert(rows[i:i + 100])
    yield store, x, rows
    store.close()


def test_new_galleries_are_embedded_and_milvus_lite_ones_still_open(tmp_path) -> None:
    assert type(open_store(str(tmp_path / "new.db"))).__name__ == "FaissStore"
    lite = MilvusStore(str(tmp_path / "lite.db"))
    lite.open(DIM)
    lite.upsert(rows_of(clustered(8)))
    lite.close()
    again = open_store(str(tmp_path / "lite.db"), create=False)
    assert isinstance(again, MilvusStore) and again.count() == 8
    again.close()
    with pytest.raises(StoreError, match="is a Milvus Lite gallery: .*gallery migrate"):
        FaissStore(str(tmp_path / "lite.db"))
    with pytest.raises(StoreError, match="does not exist"):
        open_store(str(tmp_path / "missing.db"), create=False)


def test_search_and_filters_match_brute_force(filled) -> None:
    store, x, rows = filled
    kind = {"FLAT": "IndexFlatIP", "IVF_FLAT": "IndexIVFFlat", "HNSW": "IndexHNSWFlat"}
    assert type(store.index).__name__ == kind[store.index_type] and store.index.ntotal == 600
    rng = np.random.default_rng(1)
    queries = x[rng.choice(600, 20, replace=False)] + 0.2 * rng.standard_normal((20, DIM)).astype(np.float32)
    filters = [Filters(cameras=["north"]), Filters(cameras=["south", "lobby"], start=20, end=70),
               Filters(start=100.0, end=100.0), Filters(exclude_keys=[key(3), key(7)]),
               Filters(cameras=["nowhere"]), Filters(cameras=['north" or "1"=="1'])]
    found = 0
    for q in queries:
        want = brute_force(x, rows, q, 10, Filters())
        got = [h.key for h in store.search(q, 10)[0]]
        if store.index_type == "FLAT":
            assert got == want
        found += len(set(got) & set(want))
        for f in filters:
            hits = store.search(q, 10, f)[0]
            # Filtered selections below EXACT_BELOW rows are scanned exactly, for every index.
            assert [h.key for h in hits] == brute_force(x, rows, q, 10, f), f
            for h in hits:
                assert not f.cameras or h.meta["camera"] in f.cameras
                assert (f.start or -1) <= h.meta["timestamp"] <= (f.end or 1e9)
    assert 600 < EXACT_BELOW and found / (20 * 10) >= 0.9
    hit = store.search(x[11], 1, with_vectors=True)[0][0]
    assert hit.key == key(11) and hit.score == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(np.asarray(hit.meta["vector"], np.float32), x[11])
    assert hit.meta["frame"] == 11 and hit.meta["video"] == "v1"


def test_a_wide_filter_goes_through_the_index_and_stays_exact(tmp_path, monkeypatch) -> None:
    import strongreid.search.faiss_store as fs

    monkeypatch.setattr(fs, "EXACT_BELOW", 0)  # every filtered search uses the index's selector
    x = clustered(400)
    rows = rows_of(x)
    store = FaissStore(str(tmp_path / "h.db"), index_type="HNSW", index_params={"M": 8})
    store.open(DIM)
    store.upsert(rows)
    for q in x[::37]:
        for f in (Filters(cameras=["lobby"]), Filters(start=3, end=4)):
            hits = store.search(q, 10, f)[0]
            assert len(hits) == 10
            assert all(h.meta["camera"] == "lobby" for h in hits) if f.cameras else \
                all(3 <= h.meta["timestamp"] <= 4 for h in hits)
    # A selection smaller than k: the walk cannot fill it, the exact scan does.
    f = Filters(start=7, end=7)
    assert [h.key for h in store.search(x[35], 10, f)[0]] == brute_force(x, rows, x[35], 10, f)
    store.close()


def test_index_parameters_reach_the_index(tmp_path) -> None:
    x = clustered(300)
    hnsw = FaissStore(str(tmp_path / "h.db"), index_type="HNSW",
                      index_params={"M": 12, "efConstruction": 50}, search_params={"ef": 24})
    hnsw.open(DIM)
    hnsw.upsert(rows_of(x))
    assert hnsw.index.hnsw.efConstruction == 50 and hnsw.index.hnsw.nb_neighbors(1) == 12
    assert hnsw._params().efSearch == 24
    hnsw.close()
    again = FaissStore(str(tmp_path / "h.db"))  # the built parameters are the gallery's
    assert (again.index_type, again.index_params) == ("HNSW", {"M": 12, "efConstruction": 50})
    assert again.index.hnsw.nb_neighbors(1) == 12 and again.search_params["ef"] == 24
    again.close()
    ivf = FaissStore(str(tmp_path / "i.db"), index_type="IVF_FLAT", index_params={"nlist": 5},
                     search_params={"nprobe": 3})
    ivf.open(DIM)
    ivf.upsert(rows_of(x[:199]))
    assert type(ivf.index).__name__ == "IndexFlatIP"  # 199 < 40 x 5 rows: exact until trained
    ivf.upsert(rows_of(x[199:], 199))
    assert (ivf.index.nlist, ivf._params().nprobe) == (5, 3)
    ivf.close()
    lite = MilvusStore(str(tmp_path / "m.db"), index_type="HNSW",
                       index_params={"M": 12, "efConstruction": 50})
    lite.open(DIM)
    desc = lite.client.describe_index(lite.collection, "vector")
    assert (desc["params"]["M"], desc["params"]["efConstruction"]) == (12, 50)
    lite.close()


def test_a_replaced_key_is_one_row_everywhere(filled, tmp_path) -> None:
    store, x, rows = filled
    new = -x[42]
    store.upsert([{**rows[42], "vector": new, "camera": "garage", "timestamp": 999.0}])
    assert store.count() == 600
    assert store.search(x[42], 5)[0][0].key != key(42)
    top = store.search(new, 1)[0][0]
    assert (top.key, top.meta["camera"]) == (key(42), "garage")
    assert "garage" in store.facets()["cameras"] and store.facets()["end"] == 999.0
    assert [r["camera"] for r in store.get([key(42)])] == ["garage"]
    everyone = [r["key"] for page in store.rows(64) for r in page]
    assert sorted(everyone) == sorted(r["key"] for r in rows)
    store.close()
    again = FaissStore(store.uri)
    assert again.count() == 600 and again.search(new, 1)[0][0].key == key(42)
    assert again.search(x[42], 5, Filters(cameras=["north", "south", "lobby"]))[0][0].key != key(42)
    again.close()


_WRITER = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from test_search_store import clustered, rows_of
    import strongreid.search.faiss_store as fs
    from strongreid.search.faiss_store import FaissStore
    fs.IVF_FROM = 100  # a growing IVF_FLAT trains from 100 rows (as the reading test process)
    store = FaissStore({path!r}, index_type={index!r}, index_params={params!r})
    store.open(16)
    x = clustered(100_000, seed=3)
    for b in range(0, 100_000, 50):
        store.upsert(rows_of(x[b:b + 50], b))
        print(b + 50, flush=True)   # acknowledged: upsert returned
""")


@pytest.mark.parametrize("index, params", [("HNSW", {"M": 8}), ("IVF_FLAT", {})])
def test_kill_9_during_ingest_loses_nothing_acknowledged(tmp_path, monkeypatch, index, params) -> None:
    import strongreid.search.faiss_store as fs

    monkeypatch.setattr(fs, "IVF_FROM", 100)
    path = tmp_path / "k.db"
    reader = FaissStore(str(path))  # open in this process while another one writes
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(
        tests=str(ROOT / "tests"), path=str(path), index=index, params=params)],
                            stdout=subprocess.PIPE, text=True, env=env)
    acked = 0
    try:
        while acked < 400:
            line = proc.stdout.readline()
            assert line, "the writer died before writing 400 rows"
            acked = int(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    x = clustered(100_000, seed=3)
    for store in (FaissStore(str(path)), reader):  # reopened, and caught up while open
        if store is reader:
            store.dim is None and store.open(DIM)
        n = store.count()
        assert n >= acked and n % 50 == 0  # whole batches only: a batch is one transaction
        assert store.existing([key(i) for i in range(acked)]) == {key(i) for i in range(acked)}
        for i in (0, acked // 2, acked - 1):
            assert store.search(x[i], 1)[0][0].key == key(i)
        assert store.index.ntotal == n and store.index_type == index
        if index == "IVF_FLAT":  # trained again as it grew, in the writer and in each reader
            assert store.index.nlist == fs.cells_for(n) and store.index_params == {"nlist": 0}
            np.testing.assert_array_equal(ivf_ids(store), np.arange(n))
        store.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 130), limit=st.integers(1, 70), ties=st.integers(1, 9),
       camera=st.sampled_from(["", "north"]))
def test_pages_hold_every_row_once_in_a_stable_order(tmp_path_factory, n, limit, ties, camera) -> None:
    store = FaissStore(str(tmp_path_factory.mktemp("pages") / "p.db"))
    store.open(DIM)
    rows = rows_of(clustered(max(n, 1))[:n])
    for r in rows:
        r["timestamp"] = float(int(r["frame"]) % ties)  # many rows share a time
    store.upsert(rows[::-1])
    f = Filters(cameras=[camera] if camera else [])
    pages = [store.browse(limit, offset, f) for offset in range(0, n + limit, limit)]
    seen = [(r["timestamp"], r["camera"], r["key"]) for page in pages for r in page]
    expected = sorted((r["timestamp"], r["camera"], r["key"]) for r in rows
                      if not camera or r["camera"] == camera)
    assert seen == expected
    assert all(len(p) == limit for p in pages[:len(expected) // limit])
    store.close()


def test_milvus_pages_hold_every_row_once(tmp_path) -> None:
    store = MilvusStore(str(tmp_path / "m.db"))
    store.open(DIM)
    rows = rows_of(clustered(167))
    store.upsert(rows)
    seen = [r["key"] for off in range(0, 180, 60) for r in store.browse(60, off)]
    order = sorted(rows, key=lambda r: (r["timestamp"], r["camera"], r["key"]))
    assert seen == [r["key"] for r in order]
    store.close()


def test_migrate_a_milvus_lite_gallery(tmp_path, capsys) -> None:
    x = clustered(50)
    lite = MilvusStore(str(tmp_path / "old.db"))
    lite.open(DIM)
    lite.upsert(rows_of(x))
    lite.close()
    (tmp_path / "old.thumbs" / "00").mkdir(parents=True)
    (tmp_path / "old.thumbs" / "00" / f"{key(1)}.jpg").write_bytes(b"jpeg")
    assert main(["gallery", "migrate", "--from", str(tmp_path / "old.db"),
                 "--to", str(tmp_path / "new.db"), "--index", "HNSW"]) == 0
    assert "50 rows copied" in capsys.readouterr().out
    new = open_store(str(tmp_path / "new.db"), create=False)
    assert isinstance(new, FaissStore) and new.count() == 50 and new.index_type == "HNSW"
    row = new.get([key(9)], with_vectors=True)[0]
    np.testing.assert_array_equal(np.asarray(row["vector"], np.float32), x[9])
    assert (row["camera"], row["timestamp"], row["frame"]) == ("north", 1.0, 9)
    assert (tmp_path / "new.thumbs" / "00" / f"{key(1)}.jpg").read_bytes() == b"jpeg"
    new.close()
    assert main(["gallery", "migrate", "--from", str(tmp_path / "old.db"),
                 "--to", str(tmp_path / "new.db")]) == 2
    assert "already holds 50 rows" in capsys.readouterr().err


# -- paging over the wire --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """uvicorn on 127.0.0.1 serving a 167-crop gallery in the embedded store."""
    pytest.importorskip("uvicorn", reason="the server needs pip install 'strongreid[search]'")
    from _search_utils import serving, tiny_model

    from strongreid.deploy.extractor import FeatureExtractor
    from strongreid.search.service import SearchService, create_app

    root = tmp_path_factory.mktemp("paged")
    extractor = FeatureExtractor(None, tiny_model(root / "tiny.pt"), device="cpu")
    store = open_store(str(root / "gallery.db"))
    store.open(extractor.feat_dim)
    store.upsert(rows_of(clustered(167, extractor.feat_dim)))
    app = create_app(SearchService(store, extractor, root / "gallery.thumbs", "tiny.pt"))
    with serving(app) as port:
        yield f"http://127.0.0.1:{port}"
    store.close()


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.load(r)


@pytest.mark.parametrize("limit, camera", [(60, ""), (7, ""), (60, "south")])
def test_the_gallery_pages_over_http_hold_every_crop_once(server, limit, camera) -> None:
    total = get(f"{server}/api/info")["count"]
    assert total == 167
    seen: list[dict] = []
    offset = 0
    while True:
        items = get(f"{server}/api/gallery?limit={limit}&offset={offset}&camera={camera}")["items"]
        if not items:
            break
        seen += items
        offset += limit
    keys = [i["key"] for i in seen]
    expected = 167 if not camera else sum(1 for i in range(167) if CAMS[i % 3] == camera)
    assert len(keys) == len(set(keys)) == expected
    order = [(i["timestamp"], i["camera"], i["key"]) for i in seen]
    assert order == sorted(order)
    again = [i["key"] for off in range(0, offset, limit)
             for i in get(f"{server}/api/gallery?limit={limit}&offset={off}&camera={camera}")["items"]]
    assert again == keys  # stable: the same pages twice


def test_search_over_http_on_the_embedded_store(server) -> None:
    first = get(f"{server}/api/gallery?limit=1")["items"][0]
    body = urllib.parse.urlencode({"key": first["key"], "k": "5", "cameras": "north"}).encode()
    req = urllib.request.Request(f"{server}/api/search", data=body)
    with urllib.request.urlopen(req, timeout=30) as r:
        hits = json.load(r)["hits"]
    assert len(hits) == 5 and {h["camera"] for h in hits} == {"north"}
    assert first["key"] not in {h["key"] for h in hits}
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


# -- a growing IVF_FLAT (nlist 0): trained again as the gallery grows --------------------------


def ivf_ids(store: FaissStore) -> np.ndarray:
    """Every id held in the IVF's inverted lists, sorted (each slot must be there once)."""
    from strongreid.search.faiss_store import _faiss

    faiss = _faiss()
    lists = faiss.extract_index_ivf(store.index).invlists
    ids = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
           for i in range(lists.nlist) if lists.list_size(i)]
    return np.sort(np.concatenate(ids))


def test_cells_grow_as_a_power_of_two_with_the_gallery() -> None:
    from strongreid.search.faiss_store import cells_for

    # The power of two nearest 4 sqrt(n) (rounded half up in log2: 2^10.5 = 4 sqrt(131 072)),
    # at most n / 40 (k-means' minimum per cell).
    sizes = (1, 100, 160, 320, 640, 40_960, 131_071, 131_072, 524_288, 1_000_000, 2_097_152)
    assert [cells_for(n) for n in sizes] == [1, 2, 4, 8, 16, 1024, 1024, 2048, 4096, 4096, 8192]


def test_a_growing_ivf_retrains_and_keeps_every_row_once(tmp_path, monkeypatch) -> None:
    import strongreid.search.faiss_store as fs

    monkeypatch.setattr(fs, "IVF_FROM", 100)  # exact below 100 rows, then IVF
    x = clustered(700)
    rows = rows_of(x)
    store = FaissStore(str(tmp_path / "g.db"), index_type="IVF_FLAT", search_params={"nprobe": 64})
    assert store.index_params == {"nlist": 0}  # the embedded IVF_FLAT grows by default
    store.open(DIM)
    store.upsert(rows[:99])
    assert type(store.index).__name__ == "IndexFlatIP"  # exact until IVF_FROM rows
    for i in range(99, 700, 50):
        store.upsert(rows[i:i + 50])
    # Trained at 149 rows (2 cells), again at 199 (4), 349 (8) and 649 (16): a random sample of
    # every row each time, every slot moved into the new cells.
    assert [(t["rows"], t["nlist"]) for t in store.trainings] == \
        [(149, 2), (199, 4), (349, 8), (649, 16)]
    assert store.index.nlist == fs.cells_for(700) == 16 and store._params().nprobe == 64
    np.testing.assert_array_equal(ivf_ids(store), np.arange(700))
    # nprobe >= nlist searches every cell: exact, with and without filters.
    rng = np.random.default_rng(4)
    for q in x[rng.choice(700, 10, replace=False)] + 0.2 * rng.standard_normal((10, DIM)).astype(np.float32):
        for f in (Filters(), Filters(cameras=["north"]), Filters(start=30, end=90)):
            assert [h.key for h in store.search(q, 10, f)[0]] == brute_force(x, rows, q, 10, f)
    # A key replaced after the trainings: its old slot is dead, its new one found.
    store.upsert([{**rows[5], "vector": -x[5], "camera": "garage"}])
    assert store.search(-x[5], 1)[0][0].meta["camera"] == "garage" and store.count() == 700
    store.close()
    again = FaissStore(str(tmp_path / "g.db"))
    assert (again.index_type, again.index_params) == ("IVF_FLAT", {"nlist": 0})
    assert again.index.nlist == 16 and again.index.ntotal == 701 and again.trainings == []
    assert [h.key for h in again.search(x[9], 10)[0]] == brute_force(x, rows, x[9], 10, Filters())
    again.close()


def test_a_growing_ivf_killed_between_saves_is_rebuilt_from_the_rows(tmp_path, monkeypatch) -> None:
    import strongreid.search.faiss_store as fs

    monkeypatch.setattr(fs, "IVF_FROM", 100)
    x = clustered(900)
    rows = rows_of(x)
    path = str(tmp_path / "k.db")
    store = FaissStore(path, index_type="IVF_FLAT", search_params={"nprobe": 64})
    store.open(DIM)
    store.upsert(rows[:300])
    store.close()  # the index file: 300 rows in 4 cells
    store = FaissStore(path)
    store.upsert(rows[300:900])  # trained again (16 cells) but never saved: then "killed"
    assert store.index.nlist == 16
    store.db.close()
    again = FaissStore(path, search_params={"nprobe": 64})
    # The stale file (4 cells, 300 rows) was loaded, caught up with 600 rows and retrained.
    assert [(t["rows"], t["nlist"]) for t in again.trainings] == [(900, 16)]
    assert again.index.ntotal == 900 and again.count() == 900
    np.testing.assert_array_equal(ivf_ids(again), np.arange(900))
    for i in (0, 450, 899):
        assert again.search(x[i], 1)[0][0].key == key(i)
    f = Filters(cameras=["lobby"], start=10, end=150)
    assert [h.key for h in again.search(x[7], 10, f)[0]] == brute_force(x, rows, x[7], 10, f)
    (tmp_path / "k.faiss").unlink()  # no index file at all: built from the rows
    again.db.close()
    rebuilt = FaissStore(path, search_params={"nprobe": 64})
    assert rebuilt.index.nlist == 16 and rebuilt.index.ntotal == 900
    np.testing.assert_array_equal(ivf_ids(rebuilt), np.arange(900))
    rebuilt.close()


def test_new_embedded_galleries_grow_an_ivf_and_older_ones_keep_their_index(tmp_path, capsys) -> None:
    x = clustered(60)
    old = FaissStore(str(tmp_path / "hnsw.db"), index_type="HNSW", index_params={"M": 12})
    old.open(DIM)
    old.upsert(rows_of(x))
    old.close()
    again = open_store(str(tmp_path / "hnsw.db"))  # the default is now IVF_FLAT: not for this one
    assert (again.index_type, again.index_params["M"]) == ("HNSW", 12)
    assert type(again.index).__name__ == "IndexHNSWFlat" and again.index.ntotal == 60
    assert again.search(x[3], 1)[0][0].key == key(3)
    again.close()
    assert main(["gallery", "migrate", "--from", str(tmp_path / "hnsw.db"),
                 "--to", str(tmp_path / "new.db")]) == 0
    assert "60 rows copied" in capsys.readouterr().out
    new = open_store(str(tmp_path / "new.db"), create=False)
    assert (new.index_type, new.index_params, new.search_params) == \
        ("IVF_FLAT", {"nlist": 0}, {"nprobe": 32})
    assert type(new.index).__name__ == "IndexFlatIP"  # exact until IVF_FROM rows
    new.close()

