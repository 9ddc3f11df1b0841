"""Gallery search with faiss: `strongreid index build` and `strongreid search`.

An index folder holds `index.faiss`, `meta.npz` (paths, pids, camids of the indexed images) and
`index.json` (type, metric, dimension, count and the search parameters). Distances follow the
evaluator: "euclidean" is the squared Euclidean distance (faiss' L2 index reports it squared),
"cosine" is 1 - cos (inner product of L2-normalised vectors). The exact "flat" index ranks like
`evaluate`; "ivf" (IndexIVFFlat: nlist cells, nprobe searched) and "hnsw" (IndexHNSWFlat: M
links per node, efSearch breadth) trade exactness for speed on large galleries.
faiss is imported here only, and lazily, so evaluation and the gallery service never need it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from strongreid.config import load_config
from strongreid.deploy.extractor import IMAGE_EXTENSIONS, FeatureExtractor, list_images
from strongreid.errors import StrongReIDError
from strongreid.paths import atomic_write_text, check_output_path

INDEX_TYPES = ("flat", "ivf", "hnsw")
_INDEX_FILE = "index.faiss"
_META_FILE = "meta.npz"
_INFO_FILE = "index.json"


def _faiss() -> Any:
    # faiss announces which SIMD build it loaded at INFO level; that is not the user's business.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError as exc:
        raise StrongReIDError(
            "the retrieval commands need faiss: pip install faiss-cpu (or faiss-gpu)"
        ) from exc
    return faiss


def load_features(path: str) -> dict[str, np.ndarray]:
    """feats (N x D float32), paths (N str), pids and camids (N int64, -1 when unknown) from an
    .npz (or .safetensors with its .csv index) written by `strongreid extract`."""
    p = Path(path)
    if not p.is_file():
        raise StrongReIDError(f"feature file {path} does not exist; write it with `strongreid extract`")
    if p.suffix == ".safetensors":
        return _load_safetensors(p)
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        # numpy's own advice for object arrays (allow_pickle=True) is not for a CLI user, and
        # loading pickles from a file would run its code.
        why = ("it holds Python objects (pickled), which are never loaded" if "allow_pickle" in str(exc)
               else str(exc))
        raise StrongReIDError(f"cannot read {path} as an .npz feature file: {why}; use the .npz "
                              "that `strongreid extract` writes") from None
    if "feats" not in arrays:
        raise StrongReIDError(
            f"{path} has no 'feats' array (it holds {sorted(arrays)}); use the .npz that "
            "`strongreid extract` writes"
        )
    feats = arrays["feats"]
    if feats.ndim != 2 or feats.shape[0] == 0 or feats.dtype.kind not in "fiu":
        raise StrongReIDError(f"'feats' in {path} must be a non-empty N x D numeric array, got "
                              f"shape {feats.shape} {feats.dtype}")
    n = feats.shape[0]
    paths = arrays.get("paths")
    paths = np.array([f"#{i}" for i in range(n)]) if paths is None else paths.astype(str)
    out = {"feats": np.ascontiguousarray(feats, dtype=np.float32), "paths": paths}
    for key in ("pids", "camids"):
        out[key] = arrays[key].astype(np.int64) if key in arrays else np.full(n, -1, np.int64)
    for key in ("paths", "pids", "camids"):
        if out[key].shape != (n,):
            raise StrongReIDError(f"'{key}' in {path} has shape {out[key].shape}; expected ({n},)")
    if not np.isfinite(out["feats"]).all():
        row = int(np.nonzero(~np.isfinite(out["feats"]).all(axis=1))[0][0])
        raise StrongReIDError(f"'feats' in {path} has NaN or infinite values (first in row {row})")
    return out


def _load_safetensors(p: Path) -> dict[str, np.ndarray]:
    import csv

    from safetensors.numpy import load_file

    try:
        feats = load_file(str(p))["feats"].astype(np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise StrongReIDError(f"cannot read 'feats' from {p}: {exc}") from None
    index = p.with_suffix(".csv")
    if not index.is_file():
        raise StrongReIDError(f"{p} needs its index {index} (written beside it by `strongreid extract`)")
    with open(index, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) != feats.shape[0]:
        raise StrongReIDError(f"{index} lists {len(rows)} images but {p} holds {feats.shape[0]} features")
    try:
        pids = np.array([int(r["pid"]) for r in rows], dtype=np.int64)
        camids = np.array([int(r["camid"]) for r in rows], dtype=np.int64)
        paths = np.array([r["path"] for r in rows])
    except (KeyError, ValueError) as exc:
        raise StrongReIDError(f"{index} must have columns index,path,pid,camid: {exc}") from None
    return {"feats": feats, "paths": paths, "pids": pids, "camids": camids}


def _prepare(feats: np.ndarray, metric: str) -> np.ndarray:
    x = np.ascontiguousarray(feats, dtype=np.float32)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(x, dtype=np.float32)


def build_index(
    feats: np.ndarray,
    *,
    index_type: str = "flat",
    metric: str = "euclidean",
    nlist: int | None = None,
    hnsw_m: int = 32,
) -> Any:
    """A faiss index over `feats` (see the module docstring for the types)."""
    faiss = _faiss()
    if index_type not in INDEX_TYPES:
        raise StrongReIDError(f"unknown index type {index_type!r}: use flat, ivf or hnsw")
    if metric not in ("euclidean", "cosine"):
        raise StrongReIDError(f"unknown metric {metric!r}: use euclidean or cosine")
    x = _prepare(feats, metric)
    n, dim = x.shape
    fmetric = faiss.METRIC_L2 if metric == "euclidean" else faiss.METRIC_INNER_PRODUCT
    if index_type == "flat":
        index = faiss.IndexFlatL2(dim) if metric == "euclidean" else faiss.IndexFlatIP(dim)
    elif index_type == "ivf":
        cells = int(nlist) if nlist else max(1, int(round(math.sqrt(n))))
        if not 1 <= cells <= n:
            raise StrongReIDError(f"--nlist must be between 1 and the number of features ({n}), got {cells}")
        quantizer = faiss.IndexFlatL2(dim) if metric == "euclidean" else faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, cells, fmetric)
        index.train(x)
    else:
        if hnsw_m < 2:
            raise StrongReIDError(f"--hnsw-m must be at least 2, got {hnsw_m}")
        index = faiss.IndexHNSWFlat(dim, int(hnsw_m), fmetric)
    index.add(x)
    return index


def save_index(folder: str, index: Any, info: dict[str, Any], data: dict[str, np.ndarray]) -> None:
    faiss = _faiss()
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out / _INDEX_FILE))
    with open(out / _META_FILE, "wb") as fh:
        np.savez(fh, paths=data["paths"], pids=data["pids"], camids=data["camids"])
    (out / _INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def load_index(folder: str) -> tuple[Any, dict[str, Any], dict[str, np.ndarray]]:
    """(faiss index with its search parameters set, info dict, meta arrays)."""
    faiss = _faiss()
    root = Path(folder)
    missing = [f for f in (_INDEX_FILE, _META_FILE, _INFO_FILE) if not (root / f).is_file()]
    if missing:
        raise StrongReIDError(
            f"{folder} is not an index folder (missing {', '.join(missing)}); "
            "build one with `strongreid index build FEATURES --out FOLDER`"
        )
    try:
        info = json.loads((root / _INFO_FILE).read_text(encoding="utf-8"))
        index = faiss.read_index(str(root / _INDEX_FILE))
        with np.load(root / _META_FILE, allow_pickle=False) as m:
            meta = {k: m[k] for k in m.files}
    except (OSError, ValueError, RuntimeError) as exc:
        raise StrongReIDError(f"cannot read the index in {folder}: {exc}") from None
    if info.get("type") == "ivf":
        index.nprobe = int(info["nprobe"])
    elif info.get("type") == "hnsw":
        index.hnsw.efSearch = int(info["ef_search"])
    return index, info, meta


def search(folder: str, q_feats: np.ndarray, q_paths: list[str], k: int) -> list[dict[str, Any]]:
    """Top-k gallery matches per query: [{"query", "results": [{"path", "distance", "pid",
    "camid"}, ...]}, ...], nearest first."""
    if int(k) < 1:
        raise StrongReIDError(f"-k must be at least 1, got {k}")
    index, info, meta = load_index(folder)
    if q_feats.ndim != 2 or q_feats.shape[1] != int(info["dim"]):
        raise StrongReIDError(
            f"query features have shape {q_feats.shape} but the index holds {info['dim']}-d "
            "features; extract them with the same model"
        )
    x = _prepare(q_feats, info["metric"])
    dist, idx = index.search(x, min(int(k), int(info["count"])))
    out = []
    for qi, path in enumerate(q_paths):
        hits = []
        for j, dv in zip(idx[qi], dist[qi]):
            if j < 0:  # an approximate index may find fewer than k
                continue
            value = float(dv) if info["metric"] == "euclidean" else 1.0 - float(dv)
            hits.append({
                "path": str(meta["paths"][j]),
                "distance": value,
                "pid": int(meta["pids"][j]),
                "camid": int(meta["camids"][j]),
            })
        out.append({"query": str(path), "results": hits})
    return out


def index_build_command(features: str, out: str, index_type: str = "flat", metric: str = "euclidean",
                        nlist: int | None = None, nprobe: int = 8, hnsw_m: int = 32,
                        ef_search: int = 64) -> int:
    """`strongreid index build FEATURES --out INDEX [--type flat|ivf|hnsw] [...]`."""
    if nprobe < 1 or ef_search < 1:
        raise StrongReIDError("--nprobe and --ef-search must be at least 1")
    check_output_path(out, "--out", folder=True)  # before the index is trained
    data = load_features(features)
    index = build_index(data["feats"], index_type=index_type, metric=metric, nlist=nlist, hnsw_m=hnsw_m)
    info = {
        "type": index_type,
        "metric": metric,
        "dim": int(data["feats"].shape[1]),
        "count": int(data["feats"].shape[0]),
        "nlist": int(getattr(index, "nlist", 0)),
        "nprobe": int(nprobe),
        "hnsw_m": int(hnsw_m),
        "ef_search": int(ef_search),
        "features": os.path.abspath(features),
    }
    save_index(out, index, info, data)
    print(f"{index_type} index of {info['count']} {info['dim']}-d features ({metric}) "
          f"written to {out}")
    return 0


def _query_features(query: str, config: str | None, opts: list[str]) -> tuple[np.ndarray, list[str]]:
    source = Path(query)
    if source.suffix in (".npz", ".safetensors"):
        data = load_features(str(source))
        return data["feats"], [str(p) for p in data["paths"]]
    # Images: a model is needed, described by --config / TEST.WEIGHT.
    cfg = load_config(config, list(opts))
    if not cfg.TEST.WEIGHT:
        raise StrongReIDError(
            "searching with images needs a model: pass --config FILE TEST.WEIGHT CHECKPOINT "
            "(or give --query an .npz written by `strongreid extract`)"
        )
    one_image = source.is_file() and source.suffix.lower() in IMAGE_EXTENSIONS
    paths = [str(source)] if one_image else list_images(str(source), "--query")
    feats = FeatureExtractor(config=cfg, weights=cfg.TEST.WEIGHT)(paths)
    return feats.detach().cpu().numpy().astype(np.float32), paths


def _write_text(path: Path, text: str, flag: str) -> None:
    """`text` to `path` under a temporary name, then renamed: an earlier file is replaced whole
    or kept, and a failure leaves no partial file."""
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise StrongReIDError(f"{flag} {path}: cannot write the results ({exc.strerror or exc}); "
                              "check the path, its permissions and the free space") from None


def search_command(index: str, query: str, k: int = 10, out: str | None = None,
                   config: str | None = None, opts: Sequence[str] = ()) -> int:
    """`strongreid search INDEX --query FEATURES_OR_IMAGES -k K [--out F]`: JSON results.

    `config` / `opts` (KEY VALUE) describe the model when `query` holds images."""
    if out:  # before the queries are embedded and searched
        check_output_path(out, "--out")
    feats, paths = _query_features(query, config, list(opts))
    results = search(index, feats, paths, k)
    text = json.dumps(results, indent=2)
    if out:
        _write_text(Path(out), text + "\n", "--out")
        print(f"{len(results)} queries searched; results written to {out}")
    else:
        sys.stdout.write(text + "\n")
    return 0
