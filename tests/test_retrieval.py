"""`strongreid index build` / `strongreid search` on extracted-feature files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from strongreid.cli import main
from strongreid.evaluation import evaluate, pairwise_distance


def write_features(path, feats, with_labels=True, prefix="g"):
    n = len(feats)
    arrays = {"feats": feats.astype(np.float32),
              "paths": np.array([f"{prefix}/{i:04d}.jpg" for i in range(n)])}
    if with_labels:
        arrays["pids"] = np.arange(n) % 7
        arrays["camids"] = np.arange(n) % 3
    np.savez(path, **arrays)


@pytest.fixture
def features(tmp_path):
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((12, 16)).astype(np.float32)
    write_features(tmp_path / "gallery.npz", gallery)
    write_features(tmp_path / "query.npz", queries, with_labels=False, prefix="q")
    return tmp_path, queries, gallery


def run_search(tmp_path, index, k, name="out.json"):
    out = tmp_path / name
    code = main(["search", str(index), "--query", str(tmp_path / "query.npz"), "-k", str(k),
                 "--out", str(out)])
    assert code == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_exact_index_ranks_like_evaluate(features, metric):
    tmp_path, queries, gallery = features
    index = tmp_path / f"index_{metric}"
    assert main(["index", "build", str(tmp_path / "gallery.npz"), "--out", str(index),
                 "--metric", metric]) == 0
    results = run_search(tmp_path, index, 10)
    # No query shares a camera with the gallery, so evaluate's ranked list is the plain one.
    with pytest.warns(RuntimeWarning, match="no.* valid match|none of the 12"):
        ranked = evaluate(pairwise_distance(queries, gallery, metric), np.full(12, -5),
                          np.arange(300) % 7, np.full(12, 99), np.arange(300) % 3, topk=10)
    assert [r["query"] for r in results] == [f"q/{i:04d}.jpg" for i in range(12)]
    for res, want_idx, want_dist in zip(results, ranked.topk_index, ranked.topk_dist):
        assert [m["path"] for m in res["results"]] == [f"g/{j:04d}.jpg" for j in want_idx]
        np.testing.assert_allclose([m["distance"] for m in res["results"]], want_dist,
                                   rtol=1e-4, atol=1e-4)
        assert [m["pid"] for m in res["results"]] == [int(j % 7) for j in want_idx]
        assert [m["camid"] for m in res["results"]] == [int(j % 3) for j in want_idx]


def test_ivf_with_one_cell_is_exact_and_hnsw_finds_the_nearest(features):
    tmp_path, _, _ = features
    gallery = str(tmp_path / "gallery.npz")
    assert main(["index", "build", gallery, "--out", str(tmp_path / "flat")]) == 0
    assert main(["index", "build", gallery, "--out", str(tmp_path / "ivf"), "--type", "ivf",
                 "--nlist", "1", "--nprobe", "1"]) == 0
    assert main(["index", "build", gallery, "--out", str(tmp_path / "hnsw"), "--type", "hnsw",
                 "--ef-search", "128"]) == 0
    flat = run_search(tmp_path, tmp_path / "flat", 5, "flat.json")
    ivf = run_search(tmp_path, tmp_path / "ivf", 5, "ivf.json")
    hnsw = run_search(tmp_path, tmp_path / "hnsw", 5, "hnsw.json")
    paths = [[m["path"] for m in r["results"]] for r in flat]
    assert [[m["path"] for m in r["results"]] for r in ivf] == paths
    top1 = np.mean([h["results"][0]["path"] == p[0] for h, p in zip(hnsw, paths)])
    assert top1 >= 0.9
    info = json.loads((tmp_path / "ivf" / "index.json").read_text())
    assert info["type"] == "ivf" and info["nlist"] == 1 and info["count"] == 300


def test_k_beyond_the_gallery_returns_all_and_stdout_is_json(features, capsys):
    tmp_path, _, _ = features
    small = tmp_path / "small.npz"
    write_features(small, np.eye(3, 16))
    assert main(["index", "build", str(small), "--out", str(tmp_path / "small")]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "small"), "--query", str(tmp_path / "query.npz"),
                 "-k", "10"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 12 and all(len(r["results"]) == 3 for r in results)


def test_errors_are_one_line(features, capsys):
    tmp_path, _, _ = features
    assert main(["index", "build", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    np.savez(tmp_path / "nofeats.npz", paths=np.array(["a"]))
    assert main(["index", "build", str(tmp_path / "nofeats.npz"), "--out", str(tmp_path / "x")]) == 2
    assert "no 'feats' array" in capsys.readouterr().err
    np.savez(tmp_path / "objects.npz", feats=np.array([{"a": 1}], dtype=object))
    assert main(["index", "build", str(tmp_path / "objects.npz"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot read {tmp_path / 'objects.npz'} as an .npz feature file: it holds "
                   "Python objects (pickled), which are never loaded; use the .npz that "
                   "`strongreid extract` writes\n")
    bad = np.ones((4, 16), np.float32)
    bad[1, 2] = np.nan
    write_features(tmp_path / "nan.npz", bad)
    assert main(["index", "build", str(tmp_path / "nan.npz"), "--out", str(tmp_path / "x")]) == 2
    assert "NaN" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "nowhere"), "--query", str(tmp_path / "query.npz")]) == 2
    assert "not an index folder" in capsys.readouterr().err
    write_features(tmp_path / "narrow.npz", np.ones((5, 8)))
    assert main(["index", "build", str(tmp_path / "narrow.npz"), "--out", str(tmp_path / "n")]) == 0
    assert main(["search", str(tmp_path / "n"), "--query", str(tmp_path / "query.npz")]) == 2
    assert "8-d features" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "n"), "--query", str(tmp_path / "narrow.npz"),
                 "-k", "0"]) == 2
    assert "-k must be at least 1" in capsys.readouterr().err


def test_plain_evaluation_does_not_import_faiss():
    code = "import sys, strongreid.evaluation as e; print('faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
