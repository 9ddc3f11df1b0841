"""Gallery store benchmark: insert rate, index build, query latency and recall@10 at 100k-1M crops.

    PYTHONPATH=src python benchmarks/search_store.py --sizes 100000 --index FLAT IVF_FLAT HNSW \
        --out runs/bench/search_store_100k.json

The gallery is ReID-like, not uniform noise (on which no ANN index means anything): N/8
identities seen once by each of 8 cameras. An identity is a centre on the unit sphere, drawn
around one of N/800 group centres (people dressed alike: cosine ~0.36 between centres of a
group); a view is the centre + a camera bias (a shared direction per camera, the domain shift
ReID features carry) + per-view noise, L2-normalised. Views of one identity then have cosine
~0.7, of one group ~0.25, others ~0. Queries are new views of stored identities. Per (N, index type), in a fresh process so its peak RSS is
its own:

* insert: rows of precomputed vectors + metadata upserted BATCH at a time through the store
  (durable and indexed when each call returns: FaissStore commits each batch to SQLite and
  adds it to the faiss index, training IVF when enough rows exist and, nlist 0, again each
  time the gallery has grown fourfold: those trainings are inside the rate); rows/s, and the part of
  that time spent adding to the index ("index_s");
* search: store.search(v, 10) one query at a time, as the service calls it (metadata fetched
  too): p50/p95 ms and recall@10 against exact cosine top-10 (numpy over all N, whose
  per-query latency is reported as the reference), for each search setting given (HNSW ef,
  IVF nprobe); plus one camera-filtered setting (1 camera of 8, filter applied in the index);
* the index the searches ran on (its faiss class and size), checked before timing;
* reopen: the time to open the gallery again from disk (index file + SQLite), and peak RSS.

`--backend milvus` runs the same through MilvusStore (Milvus Lite, whichever version is
installed), waiting for describe_index to report every row indexed before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VIEWS, CAMERAS, GROUP = 8, 8, 100
SETTINGS = {"FLAT": [{}], "IVF_FLAT": [{"nprobe": p} for p in (8, 16, 32, 64)],
            "HNSW": [{"ef": e} for e in (32, 64, 128, 256)]}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def identities(n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(identity centres, camera biases) of an n-crop gallery: the centres are themselves
    grouped (people dressed alike), so the nearest other identities are graded, not a crowd."""
    rng = np.random.default_rng(0)
    ids = max(1, n // VIEWS)
    groups = unit(rng.standard_normal((max(1, ids // GROUP), dim), dtype=np.float32))
    own = unit(rng.standard_normal((ids, dim), dtype=np.float32))
    centres = unit(0.6 * groups[np.arange(ids) % len(groups)] + 0.8 * own)
    cams = unit(rng.standard_normal((CAMERAS, dim), dtype=np.float32))
    return centres, cams


def views(centres: np.ndarray, cams: np.ndarray, who: np.ndarray, cam: np.ndarray,
          rng: np.random.Generator) -> np.ndarray:
    """Normalised views: centre + camera bias + per-view noise."""
    noise = rng.standard_normal((len(who), centres.shape[1]), dtype=np.float32)
    return unit(centres[who] + 0.35 * cams[cam] + noise * (0.55 / np.sqrt(centres.shape[1])))


def gallery_vectors(n: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(n x dim float32 features, their camera ids, the identity centres, the camera biases)."""
    centres, cams = identities(n, dim)
    rng = np.random.default_rng(1)
    out = np.empty((n, dim), np.float32)
    cam = (np.arange(n) % CAMERAS).astype(np.int64)
    for lo in range(0, n, 65536):  # in chunks: a float64 1M x 512 draw would take 4 GB
        idx = np.arange(lo, min(n, lo + 65536))
        out[lo:idx[-1] + 1] = views(centres, cams, (idx // VIEWS) % len(centres), cam[idx], rng)
    return out, cam, centres, cams


def query_vectors(centres: np.ndarray, cams: np.ndarray, q: int) -> np.ndarray:
    """New views of stored identities: fresh noise, a random camera."""
    rng = np.random.default_rng(2)
    who = rng.choice(len(centres), q, replace=False)
    return views(centres, cams, who, rng.integers(0, CAMERAS, q), rng).astype(np.float32)


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def rss_mb() -> dict[str, float]:
    status = Path("/proc/self/status").read_text()
    now = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rss_mb": round(now / 1024, 1), "peak_rss_mb": round(peak / 1024, 1)}


def exact_top10(gallery: np.ndarray, q: np.ndarray, allowed: np.ndarray | None = None
                ) -> tuple[list[set[int]], list[float]]:
    """Exact cosine top-10 per query (numpy), and its per-query latency."""
    truth, ms = [], []
    for v in q:
        t0 = time.perf_counter()
        s = gallery @ v
        if allowed is not None:
            s[~allowed] = -np.inf
        top = np.argpartition(-s, 10)[:10]
        ms.append((time.perf_counter() - t0) * 1000)
        truth.append(set(top.tolist()))
    return truth, ms


def timed_search(store, q: np.ndarray, truth: list[set[int]], filters=None) -> dict:
    for v in q[:5]:  # warm-up
        store.search(v, 10, filters)
    ms, recall = [], []
    for v, t in zip(q, truth):
        t0 = time.perf_counter()
        hits = store.search(v, 10, filters)[0]
        ms.append((time.perf_counter() - t0) * 1000)
        recall.append(len({int(h.key, 16) for h in hits} & t) / 10)
    return {**percentiles(ms), "recall_at_10": round(float(np.mean(recall)), 4)}


def wait_for_milvus_index(store, n: int, limit: float = 120.0) -> tuple[float, dict]:
    """Waits until describe_index reports every row indexed (at most `limit` s: Milvus Lite 2.5
    reports 0 rows in every state), and returns the wait and what it last reported."""
    t1 = time.perf_counter()
    while True:
        info = store.client.describe_index(store.collection, "vector")
        done = int(info.get("indexed_rows", 0)) >= n and int(info.get("pending_index_rows", 0)) == 0
        if done or time.perf_counter() - t1 > limit:
            return time.perf_counter() - t1, info
        time.sleep(1.0)


def run_one(backend: str, n: int, dim: int, index: str, queries: int, batch: int,
            work: Path, params: dict, search: list[dict] | None = None,
            next_training: bool = False) -> dict:
    """One (backend, N, index type) in this process."""
    from strongreid.search.store import Filters, MilvusStore

    t0 = time.perf_counter()
    gallery, cam, centres, cams = gallery_vectors(n, dim)
    q = query_vectors(centres, cams, queries)
    gen_s = time.perf_counter() - t0
    truth, exact_ms = exact_top10(gallery, q)
    cam_truth, _ = exact_top10(gallery, q, cam == 0)
    path = work / f"{backend}_{index}_{n}.db"
    if backend == "faiss":
        from strongreid.search.faiss_store import FaissStore
        store = FaissStore(str(path), index_type=index, index_params=params or None)
    else:
        store = MilvusStore(str(path), index_type=index, index_params=params or None)
    store.open(dim)
    index_s = 0.0
    if backend == "faiss":  # time the index's share of each upsert
        add = store._add

        def timed_add(v):
            nonlocal index_s
            t = time.perf_counter()
            add(v)
            index_s += time.perf_counter() - t
        store._add = timed_add
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        store.upsert([{"key": f"{j:040x}", "vector": gallery[j], "camera": f"cam{cam[j]}",
                       "timestamp": float(j), "video": f"cam{cam[j]}/video.mp4"}
                      for j in range(lo, hi)])
        if hi % 100_000 == 0:  # progress, so a run stopped by a time limit still tells its rate
            print(json.dumps({"n": n, "index": index, "inserted": hi,
                              "seconds": round(time.perf_counter() - t0, 1),
                              "index_s": round(index_s, 1)}), file=sys.stderr, flush=True)
    insert_s = time.perf_counter() - t0
    out = {"backend": backend, "n": n, "dim": dim, "index": index, "batch": batch,
           "generate_s": round(gen_s, 1), "insert_rows_per_s": round(n / insert_s, 1),
           "insert_s": round(insert_s, 1)}
    if backend == "faiss":
        out["index_s"] = round(index_s, 1)
        out["index_params"] = store.index_params
        out["faiss_index"] = type(store.index).__name__
        out["index_ntotal"] = int(store.index.ntotal)
        from strongreid.search.faiss_store import IVF_FROM, TRAIN_PER_LIST, cells_for
        expected = {"FLAT": "IndexFlatIP", "IVF_FLAT": "IndexIVFFlat", "HNSW": "IndexHNSWFlat"}
        nlist = store.index_params.get("nlist")
        if index == "IVF_FLAT" and n < (IVF_FROM if nlist == 0 else TRAIN_PER_LIST * nlist):
            expected[index] = "IndexFlatIP"  # too few rows to train on: still exact
        assert out["faiss_index"] == expected[index] and store.index.ntotal == n, out
        if out["faiss_index"] == "IndexIVFFlat":
            out["ivf_nlist"] = int(store.index.nlist)
            assert out["ivf_nlist"] == (cells_for(n) if nlist == 0 else nlist), out
            out["trainings"] = list(store.trainings)  # each one's time is inside insert_s
    else:
        import milvus_lite

        wait, info = wait_for_milvus_index(store, n)
        out["index_wait_s"] = round(wait, 1)
        out["describe_index"] = {k: str(v) for k, v in info.items()}
        out["milvus_lite"] = milvus_lite.__file__
    out["exact_numpy"] = percentiles(exact_ms)
    out["search"] = []
    for setting in search or SETTINGS[index]:
        store.search_params = {**store.search_params, **setting}
        r = {"params": dict(setting), **timed_search(store, q, truth)}
        r["over_exact"] = round(r["p50_ms"] / out["exact_numpy"]["p50_ms"], 3)
        out["search"].append(r)
        print(json.dumps({"n": n, "index": index, **r}), file=sys.stderr, flush=True)
    out["camera_filtered"] = {"params": dict(store.search_params),
                              **timed_search(store, q, cam_truth, Filters(cameras=["cam0"]))}
    if next_training and out.get("ivf_nlist") and store.index_params["nlist"] == 0:
        # The gallery's next training (twice the cells, every row moved in), timed now: a
        # rate measured just before it would flatter a growing IVF.
        out["before_next_training"] = rss_mb()
        t0 = time.perf_counter()
        store._train(2 * out["ivf_nlist"])
        out["next_training_s"] = round(time.perf_counter() - t0, 1)
        out["insert_rows_per_s_with_next_training"] = round(
            n / (insert_s + out["next_training_s"]), 1)
    out.update(rss_mb())
    t0 = time.perf_counter()
    store.close()
    out["close_s"] = round(time.perf_counter() - t0, 1)
    if backend == "faiss":
        t0 = time.perf_counter()
        again = FaissStore(str(path))
        out["reopen_s"] = round(time.perf_counter() - t0, 1)
        again.db.close()
        out["index_file_mb"] = round(path.with_suffix(".faiss").stat().st_size / 2**20, 1)
    out["db_mb"] = round(sum(f.stat().st_size for f in work.rglob("*") if f.is_file()) / 2**20, 1)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    p.add_argument("--dim", type=int, default=512, help="feature size (ResNet-18: 512, ResNet-50: 2048)")
    p.add_argument("--index", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--backend", default="faiss", choices=["faiss", "milvus"])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--batch", type=int, default=5000, help="rows per upsert call")
    p.add_argument("--params", default="{}", help="JSON index build parameters (e.g. '{\"M\": 32}')")
    p.add_argument("--search", default=None,
                   help="JSON list of search settings to sweep (default: the index type's own)")
    p.add_argument("--next-training", action="store_true",
                   help="a growing IVF_FLAT (nlist 0): also time its next training, at the end")
    p.add_argument("--work", default=None, help="folder for the gallery files (default: /tmp)")
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # the child: one size, one index type, its result as JSON on stdout
        work = Path(tempfile.mkdtemp(prefix="search_bench_", dir=args.work))
        try:
            r = run_one(args.backend, args.sizes[0], args.dim, args.index[0], args.queries,
                        args.batch, work, json.loads(args.params),
                        json.loads(args.search) if args.search else None, args.next_training)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(r))
        return 0
    results: dict = {"cpus": len(os.sched_getaffinity(0)), "load_avg_start": os.getloadavg(),
                     "runs": []}
    for n in args.sizes:
        for index in args.index:
            cmd = [sys.executable, __file__, "--one", "--sizes", str(n), "--index", index,
                   "--dim", str(args.dim), "--backend", args.backend, "--queries",
                   str(args.queries), "--batch", str(args.batch), "--params", args.params,
                   *(["--search", args.search] if args.search else []),
                   *(["--work", args.work] if args.work else []),
                   *(["--next-training"] if args.next_training else [])]
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            r["load_avg_after"] = os.getloadavg()
            results["runs"].append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
