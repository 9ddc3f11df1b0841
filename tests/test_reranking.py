"""k-reciprocal re-ranking against a plain dense implementation of the published algorithm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from strongreid.errors import StrongReIDError
from strongreid.evaluation import re_ranking


def dense_re_ranking(q, g, k1=20, k2=6, lambda_value=0.3):
    """Zhong et al.'s algorithm as reid-strong-baseline writes it, dense, in float64, with a
    stable argsort (ties by index) and without the float16 storage."""
    x = np.concatenate([q, g]).astype(np.float64)
    num_q, n = len(q), len(x)
    sq = (x * x).sum(axis=1)
    dist = sq[:, None] + sq[None, :] - 2 * x @ x.T
    dist = np.transpose(dist / np.max(dist, axis=0))
    rank = np.argsort(dist, axis=1, kind="stable")
    v = np.zeros((n, n))
    half = int(np.around(k1 / 2))
    for i in range(n):
        forward = rank[i, : k1 + 1]
        backward = rank[forward, : k1 + 1]
        recip = forward[np.where(backward == i)[0]]
        expanded = recip
        for c in recip:
            c_forward = rank[c, : half + 1]
            c_backward = rank[c_forward, : half + 1]
            c_recip = c_forward[np.where(c_backward == c)[0]]
            if len(np.intersect1d(c_recip, recip)) > 2 / 3 * len(c_recip):
                expanded = np.append(expanded, c_recip)
        expanded = np.unique(expanded)
        weight = np.exp(-dist[i, expanded])
        v[i, expanded] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.zeros((num_q, n))
    for i in range(num_q):
        shared = np.minimum(v[i][None, :], v).sum(axis=1)
        jaccard[i] = 1 - shared / (2 - shared)
    final = jaccard * (1 - lambda_value) + dist[:num_q] * lambda_value
    return final[:, num_q:]


@pytest.mark.parametrize(
    "kind, k1, k2, lam, block",
    [
        ("float", 20, 6, 0.3, 64),  # the paper's parameters, many blocks
        ("float", 5, 1, 0.5, 7),  # no local query expansion, tiny blocks
        ("int", 20, 6, 0.3, 100),  # integer features: many exact distance ties
        ("int", 3, 3, 0.0, 1000),  # pure Jaccard, one block
        ("int", 7, 2, 1.0, 33),  # pure normalised distance
    ],
)
def test_matches_the_dense_algorithm(kind, k1, k2, lam, block):
    rng = np.random.default_rng(k1 * 10 + k2)
    if kind == "int":
        q = rng.integers(-5, 6, (40, 12)).astype(np.float32)
        g = rng.integers(-5, 6, (260, 12)).astype(np.float32)
    else:
        centers = rng.standard_normal((30, 24))
        q = (centers[rng.integers(0, 30, 40)] + 0.5 * rng.standard_normal((40, 24)))
        g = (centers[rng.integers(0, 30, 260)] + 0.5 * rng.standard_normal((260, 24)))
        q, g = q.astype(np.float32), g.astype(np.float32)
    got = re_ranking(q, g, k1=k1, k2=k2, lambda_value=lam, block_size=block)
    want = dense_re_ranking(q, g, k1, k2, lam)
    assert got.dtype == np.float32 and got.shape == (40, 260)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_more_neighbours_than_samples_and_torch_input():
    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((2, 5)), rng.standard_normal((6, 5))
    got = re_ranking(torch.from_numpy(q), torch.from_numpy(g), k1=20, k2=6)
    np.testing.assert_allclose(got, dense_re_ranking(q, g, 20, 6), atol=1e-5, rtol=0)


def test_hand_computed_three_points():
    # 1-D features q = 0, g = 1 and 10: squared distances 1, 100, 81; row maxima 100, 81, 100.
    # k1 = 1, k2 = 1: E(q) = E(g1) = {q, g1} and E(g10) = {g10}.
    lam = 0.3
    out = re_ranking(np.array([[0.0]]), np.array([[1.0], [10.0]]), k1=1, k2=1, lambda_value=lam)
    a = 1 / (1 + math.exp(-0.01))  # V[q] over (q, g1): weights exp(-0), exp(-1/100)
    b = math.exp(-1 / 81) / (1 + math.exp(-1 / 81))  # V[g1] over (q, g1)
    shared = min(a, b) + min(1 - a, 1 - b)
    jaccard = 1 - shared / (2 - shared)
    np.testing.assert_allclose(out, [[(1 - lam) * jaccard + lam * 0.01, 1.0]], atol=1e-6)
    # lambda = 1 leaves the max-normalised squared distance.
    np.testing.assert_allclose(
        re_ranking(np.array([[0.0]]), np.array([[1.0], [10.0]]), k1=1, k2=1, lambda_value=1.0),
        [[0.01, 1.0]], atol=1e-7)


def test_identical_features_give_finite_output():
    out = re_ranking(np.ones((2, 3)), np.ones((4, 3)), k1=2, k2=2)
    assert np.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k1": 0}, "k1 must be a positive integer"),
        ({"k2": 1.5}, "k2 must be a positive integer"),
        ({"lambda_value": 1.5}, "lambda must be in"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(StrongReIDError, match=message):
        re_ranking(np.ones((2, 3)), np.ones((4, 3)), **kwargs)


def test_bad_features():
    with pytest.raises(StrongReIDError, match="dimension"):
        re_ranking(np.ones((2, 3)), np.ones((4, 2)))
    bad = np.ones((4, 3))
    bad[2, 0] = np.inf
    with pytest.raises(StrongReIDError, match="g_feats has NaN or infinite values"):
        re_ranking(np.ones((2, 3)), bad)
    with pytest.raises(StrongReIDError, match="q_feats is empty"):
        re_ranking(np.ones((0, 3)), np.ones((4, 3)))
