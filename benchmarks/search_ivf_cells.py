"""IVF cells against recall at one gallery size: faiss alone, on benchmarks/search_store.py's gallery.

    PYTHONPATH=src python benchmarks/search_ivf_cells.py --n 1000000 --cells 1024:first 1024 2048 4096

Each `NLIST[:first]` is an `IndexIVFFlat` (inner product) trained on TRAIN_PER_LIST x NLIST rows:
the first rows of the gallery as it was inserted (identity by identity, as a gallery that grows
would have them when it first trains) with `:first`, else a random sample of every row; then
every row added, and recall@10 against exact top-10 for 200 queries (new views of stored
identities) at each nprobe, with the per-query time of a 200-query batch. What it answers: how
many cells a gallery of this size needs, and whether the training sample is what loses recall.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from search_store import exact_top10, gallery_vectors, query_vectors  # noqa: E402

from strongreid.search.faiss_store import TRAIN_PER_LIST, _faiss  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--cells", nargs="+", default=["1024:first", "1024", "2048", "4096"])
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64, 128])
    args = p.parse_args()
    faiss = _faiss()
    gallery, _, centres, cams = gallery_vectors(args.n, args.dim)
    q = query_vectors(centres, cams, 200)
    truth, _ = exact_top10(gallery, q)
    for spec in args.cells:
        nlist, _, how = spec.partition(":")
        nlist = int(nlist)
        m = min(args.n, TRAIN_PER_LIST * nlist)
        rng = np.random.default_rng(0)
        sample = gallery[:m] if how == "first" else \
            gallery[np.sort(rng.choice(args.n, m, replace=False))]
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(args.dim), args.dim, nlist,
                                 faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        ivf.train(sample)
        out = {"n": args.n, "nlist": nlist, "trained_on": f"{how or 'random'} {m}",
               "train_s": round(time.perf_counter() - t0, 1)}
        t0 = time.perf_counter()
        ivf.add(gallery)
        out["add_s"] = round(time.perf_counter() - t0, 1)
        for nprobe in args.nprobe:
            t0 = time.perf_counter()
            _, found = ivf.search(q, 10, params=faiss.SearchParametersIVF(nprobe=nprobe))
            ms = (time.perf_counter() - t0) / len(q) * 1000
            recall = np.mean([len(set(f.tolist()) & t) / 10 for f, t in zip(found, truth)])
            out[f"nprobe {nprobe}"] = {"recall_at_10": round(float(recall), 3),
                                       "ms_per_query": round(ms, 2)}
        print(json.dumps(out), flush=True)
        del ivf
    return 0


if __name__ == "__main__":
    sys.exit(main())
