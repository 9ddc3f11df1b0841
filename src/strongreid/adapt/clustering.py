"""Pseudo-identities: k-reciprocal Jaccard distances -> DBSCAN, as cluster-contrast does.

Each epoch of unsupervised training (Dai et al., "Cluster Contrast for Unsupervised Person
Re-Identification", 2021) clusters the features of every unlabelled training image; clusters
become training identities and the points DBSCAN leaves as noise sit the epoch out. The
distance graph is sparse (strongreid.evaluation.reranking.jaccard_graph), so the clustering of
MSMT17's 32,621 training images fits in a few GB instead of the N x N matrices the reference
code builds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from strongreid.errors import StrongReIDError
from strongreid.evaluation.reranking import jaccard_graph


def pseudo_labels(
    feats: Any,
    *,
    eps: float = 0.6,
    min_samples: int = 4,
    k1: int = 30,
    k2: int = 6,
    must_link: Any = None,
) -> np.ndarray:
    """Cluster ids 0..C-1 per row of `feats`, -1 for outliers (DBSCAN noise).

    `must_link`: one group id per row (-1: none), e.g. within-camera tracklet ids: rows of a
    group are put at distance 0 from each other before clustering, so a tracklet is never
    split (it can still be left out as a whole when it is sparse and alone).
    """
    if not float(eps) > 0:
        raise StrongReIDError(f"clustering eps must be > 0, got {eps!r}")
    if isinstance(min_samples, bool) or int(min_samples) != min_samples or min_samples < 1:
        raise StrongReIDError(f"clustering min_samples must be a positive integer, got {min_samples!r}")
    n = len(feats)
    groups = None
    if must_link is not None:
        groups = np.asarray(must_link).astype(np.int64).ravel()
        if groups.shape[0] != n:
            raise StrongReIDError(
                f"must_link has {groups.shape[0]} entries but there are {n} features: give one "
                "group id per image (-1 for none)"
            )
    graph = jaccard_graph(feats, k1=k1, k2=k2)
    if groups is not None:
        graph = _link(graph, groups)
    from sklearn.cluster import DBSCAN

    labels = DBSCAN(eps=float(eps), min_samples=int(min_samples), metric="precomputed").fit_predict(graph)
    return labels.astype(np.int64)


def _link(graph: sp.csr_matrix, groups: np.ndarray) -> sp.csr_matrix:
    """Distance 0 between every two rows of one group (explicit entries, kept by DBSCAN)."""
    rows, cols = [], []
    order = np.argsort(groups, kind="stable")
    ids, starts, counts = np.unique(groups[order], return_index=True, return_counts=True)
    for gid, start, count in zip(ids, starts, counts):
        if gid < 0 or count < 2:
            continue
        members = order[start : start + count]
        rows.append(np.repeat(members, count))
        cols.append(np.tile(members, count))
    if not rows:
        return graph
    r, c = np.concatenate(rows), np.concatenate(cols)
    coo = graph.tocoo()
    n = graph.shape[0]
    keys = np.concatenate([coo.row.astype(np.int64) * n + coo.col, r * n + c])
    vals = np.concatenate([coo.data, np.zeros(r.size, np.float32)])
    # Sorted by key, then distance: the first of each key is its smallest distance.
    order = np.lexsort((vals, keys))
    keys, vals = keys[order], vals[order]
    first = np.ones(keys.size, bool)
    first[1:] = keys[1:] != keys[:-1]
    keys, vals = keys[first], vals[first]
    return sp.csr_matrix((vals, (keys // n, keys % n)), shape=graph.shape)
