"""Gallery store benchmark: ingest crops/s, and query latency + recall@10 against exact search.

    PYTHONPATH=src python benchmarks/search_store.py --sizes 100000 --index FLAT HNSW \
        --out runs/bench/search_store.json

1. Ingest: synthetic footage -> PyAV decode -> FeatureExtractor (a random-weight ResNet-18 at
   64x32, CPU) -> Milvus Lite, crops/s; with the bare embedding rate of the same crops in the
   same process as the reference (the ratio is what decoding, thumbnails and the store cost).
2. Search: N synthetic embeddings (N/10 identities, 10 noisy views each, L2-normalised, like
   ReID features) in a Milvus Lite collection per index type; Q held-out queries; latency
   p50/p95 of one query at a time, and recall@10 against exact cosine top-10 computed with
   numpy, whose per-query latency is reported alongside as the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

INDEX_PARAMS = {
    "FLAT": ({}, {}),
    "IVF_FLAT": ({"nlist": 0}, {"nprobe": 32}),  # nlist 0: 4 sqrt(N), set per size
    "HNSW": ({"M": 16, "efConstruction": 128}, {"ef": 64}),
}
_EMPTY_META = {"camera": "", "video": "", "source": "", "frame": 0, "timestamp": 0.0, "left": 0,
               "top": 0, "width": 0, "height": 0, "track": 0, "pid": 0, "score": 0.0}


def embeddings(n: int, dim: int, seed: int) -> np.ndarray:
    """n L2-normalised vectors: n/10 identity centres, 10 noisy views of each."""
    rng = np.random.default_rng(seed)
    ids = max(1, n // 10)
    centres = rng.standard_normal((ids, dim)).astype(np.float32)
    x = centres[np.arange(n) % ids] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def bench_ingest(work: Path) -> dict:
    from _search_utils import footage_crops, make_footage, tiny_model

    from strongreid.deploy.extractor import FeatureExtractor
    from strongreid.search.ingest import ingest
    from strongreid.search.store import MilvusStore

    footage = work / "footage"
    make_footage(footage, people=6, frames=40)
    extractor = FeatureExtractor(None, tiny_model(work / "tiny.pt"), device="cpu")
    crops = footage_crops(footage)[0]
    extractor(crops[:8])  # warm-up
    t0 = time.perf_counter()
    extractor(crops)
    embed_rate = len(crops) / (time.perf_counter() - t0)
    store = MilvusStore(str(work / "ingest.db"))
    stats = ingest(store, extractor, work / "ingest.thumbs", videos=[str(footage)],
                   detections="gt", progress=False)
    again = ingest(store, extractor, work / "ingest.thumbs", videos=[str(footage)],
                   detections="gt", progress=False)
    store.close()
    return {"crops": stats.added, "crops_per_s": round(stats.rate, 1),
            "embed_only_crops_per_s": round(embed_rate, 1),
            "ingest_over_embed": round(stats.rate / embed_rate, 3),
            "rerun_seconds": round(again.seconds, 3), "rerun_added": again.added}


def bench_search(work: Path, n: int, dim: int, index: str, queries: int, batch: int) -> dict:
    from strongreid.search.store import MilvusStore

    gallery = embeddings(n, dim, seed=0)
    # Queries are new views of stored identities: a stored vector plus fresh noise.
    rng = np.random.default_rng(1)
    q = gallery[rng.choice(n, queries, replace=False)]
    q = q + 0.3 * rng.standard_normal(q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)

    exact, exact_ms = [], []
    for v in q:
        t0 = time.perf_counter()
        s = gallery @ v
        top = np.argpartition(-s, 10)[:10]
        exact.append(set(top[np.argsort(-s[top])].tolist()))
        exact_ms.append((time.perf_counter() - t0) * 1000)

    index_params, search_params = (dict(p) for p in INDEX_PARAMS[index])
    if index_params.get("nlist") == 0:
        index_params["nlist"] = int(round(4 * np.sqrt(n)))
    path = work / f"bench_{index}_{n}.db"
    store = MilvusStore(str(path), index_type=index, index_params=index_params,
                        search_params=search_params)
    store.open(dim)
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        rows = [{"key": f"{j:040x}", "vector": gallery[j], **_EMPTY_META}
                for j in range(i, min(n, i + batch))]
        store.client.insert(store.collection, rows)
    store.flush()
    insert_s = time.perf_counter() - t0
    # Indexes are built in the background after the flush; until then a search scans the
    # unindexed segments. Wait, so the figures are the index's.
    t1 = time.perf_counter()
    while time.perf_counter() - t1 < 1800:
        info = store.client.describe_index(store.collection, "vector")
        if int(info.get("indexed_rows", 0)) >= n and int(info.get("pending_index_rows", 0)) == 0:
            break
        time.sleep(1.0)
    index_s = time.perf_counter() - t1
    for v in q[:5]:  # warm-up: the first searches load segments
        store.search(v, 10)
    ms, recall = [], []
    for v, truth in zip(q, exact):
        t0 = time.perf_counter()
        hits = store.search(v, 10)[0]
        ms.append((time.perf_counter() - t0) * 1000)
        recall.append(len({int(h.key, 16) for h in hits} & truth) / 10)
    store.close()
    # Milvus Lite 3 keeps a gallery in a folder named like the file.
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return {"n": n, "dim": dim, "index": index, "index_params": index_params,
            "search_params": search_params, "insert_vectors_per_s": round(n / insert_s, 1),
            "index_build_s": round(index_s, 1),
            **percentiles(ms), "recall_at_10": round(float(np.mean(recall)), 4),
            "exact_numpy": percentiles(exact_ms),
            "latency_over_exact": round(float(np.median(ms) / np.median(exact_ms)), 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    p.add_argument("--dim", type=int, default=512, help="feature size (ResNet-18: 512, ResNet-50: 2048)")
    p.add_argument("--index", nargs="+", default=list(INDEX_PARAMS), choices=list(INDEX_PARAMS))
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--batch", type=int, default=5000, help="rows per insert call")
    p.add_argument("--skip-ingest", action="store_true")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="search_bench_"))
    results: dict = {"cpus": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg()[0]}
    try:
        if not args.skip_ingest:
            results["ingest"] = bench_ingest(work)
            print(json.dumps({"ingest": results["ingest"]}), flush=True)
        results["search"] = []
        for n in args.sizes:
            for index in args.index:
                r = bench_search(work, n, args.dim, index, args.queries, args.batch)
                results["search"].append(r)
                print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
