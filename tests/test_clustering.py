"""Pseudo-identities from unlabelled features: k-reciprocal Jaccard graph and DBSCAN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strongreid.adapt.clustering import pseudo_labels
from strongreid.errors import StrongReIDError
from strongreid.evaluation.reranking import jaccard_graph


def _reference_jaccard(x: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """The dense algorithm, step by step, as cluster-contrast computes it (k1 neighbours with
    self, expansion by round(k1/2)-reciprocal sets, softmax(-d) weights, k2 query expansion)."""
    n = x.shape[0]
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    rank = np.argsort(d, axis=1, kind="stable")[:, :k1]

    def reciprocal(i: int, k: int) -> np.ndarray:
        fwd = rank[i, : k + 1]
        return fwd[[i in rank[j, : k + 1] for j in fwd]]

    half = [reciprocal(i, round(k1 / 2)) for i in range(n)]
    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        e = list(r)
        for c in r:
            if len(np.intersect1d(half[c], r)) > 2 / 3 * len(half[c]):
                e.extend(half[c])
        e = np.unique(e)
        w = np.exp(-d[i, e])
        v[i, e] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    out = np.zeros((n, n))
    for i in range(n):
        s = np.minimum(v[i][None, :], v).sum(1)
        out[i] = 1 - s / (2 - s)
    return np.maximum(out, 0.0)


def _clustered(n_ids: int, per_id: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    labels = np.repeat(np.arange(n_ids), per_id)
    x = centres[labels] + spread * rng.normal(size=(labels.size, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


@pytest.mark.parametrize("k1,k2", [(6, 3), (8, 1), (4, 2)])
def test_jaccard_graph_equals_the_dense_algorithm(k1, k2):
    x, _ = _clustered(8, 6, 12, 0.6, seed=k1 + k2)
    graph = jaccard_graph(x, k1=k1, k2=k2, block_size=16)
    dense = np.ones(graph.shape)
    coo = graph.tocoo()
    dense[coo.row, coo.col] = coo.data
    ref = _reference_jaccard(x.astype(np.float64), k1, k2)
    np.testing.assert_allclose(dense, ref, atol=2e-5)
    diagonal = graph[np.arange(len(x)), np.arange(len(x))]
    assert np.all(np.abs(diagonal) < 1e-6) and graph.nnz < x.shape[0] ** 2
    assert (graph.tocoo().row == graph.tocoo().col).sum() == len(x)  # every diagonal stored


def test_a_hand_computed_pair():
    # Two identical points and one far away, k1 = 2, k2 = 1: each of the pair is the other's
    # reciprocal neighbour, V = (1/2, 1/2) on both, s = 1, distance 0; the far point shares
    # nothing with them (distance 1, not stored).
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    g = jaccard_graph(x, k1=2, k2=1).toarray()
    assert g[0, 1] == pytest.approx(0.0, abs=1e-6) and g[1, 0] == pytest.approx(0.0, abs=1e-6)
    assert g[0, 2] == 0.0 and g[2, 0] == 0.0  # absent: the implicit distance 1
    assert jaccard_graph(x, k1=2, k2=1)[0, 2] == 0 and jaccard_graph(x, k1=2, k2=1).nnz == 5


def test_pseudo_labels_find_the_identities():
    x, truth = _clustered(12, 8, 32, 0.35, seed=0)
    labels = pseudo_labels(x, eps=0.6, min_samples=4, k1=10, k2=4)
    assert labels.shape == truth.shape and labels.dtype == np.int64
    kept = labels >= 0
    assert kept.mean() > 0.9
    # Every found cluster is pure and every identity is found once.
    for c in np.unique(labels[kept]):
        assert len(np.unique(truth[labels == c])) == 1
    assert len(np.unique(labels[kept])) == 12


def test_must_link_joins_a_tracklet_that_features_split():
    x, truth = _clustered(6, 8, 32, 0.35, seed=1)
    # Identity 0's last four crops look like another person (say, after turning around)...
    x[4:8] = x[8:12][::-1] * 0.98 + 0.02 * x[0:4]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    plain = pseudo_labels(x, eps=0.6, min_samples=4, k1=10, k2=4)
    assert len(set(plain[0:4]) | set(plain[4:8])) > 1 or plain[0] < 0
    # ... but one tracklet holds crops 0-7: must-link puts them into one cluster.
    tracklets = np.full(len(x), -1)
    tracklets[0:8] = 5
    linked = pseudo_labels(x, eps=0.6, min_samples=4, k1=10, k2=4, must_link=tracklets)
    assert len(set(linked[0:8])) == 1 and linked[0] >= 0


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 40), k1=st.integers(1, 12), k2=st.integers(1, 6), seed=st.integers(0, 99))
def test_labels_are_dense_and_outliers_minus_one(n, k1, k2, seed):
    x = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    labels = pseudo_labels(torch.from_numpy(x), eps=0.5, min_samples=2, k1=k1, k2=k2)
    found = np.unique(labels[labels >= 0])
    assert np.array_equal(found, np.arange(found.size))  # 0..C-1, no gaps
    assert set(np.unique(labels)) <= {-1, *found.tolist()}


def test_bad_arguments_are_clear_errors():
    x = np.zeros((5, 4), np.float32)
    with pytest.raises(StrongReIDError, match="eps"):
        pseudo_labels(x, eps=0.0)
    with pytest.raises(StrongReIDError, match="min_samples"):
        pseudo_labels(x, min_samples=0)
    with pytest.raises(StrongReIDError, match="must_link has 3 entries but there are 5"):
        pseudo_labels(x, must_link=np.zeros(3))
    with pytest.raises(StrongReIDError, match="k1"):
        jaccard_graph(x, k1=0)
