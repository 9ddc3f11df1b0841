"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) with reid-strong-baseline's conventions,
computed without any N x N array (N = queries + gallery).

The original (utils/re_ranking.py) builds the dense N x N squared Euclidean matrix, argsorts it,
and loops in Python; MSMT17 needs ~150 GiB that way. Same algorithm here, step by step:

1. d = squared Euclidean distances of the given features, each row divided by its maximum over
   all N entries. One blocked pass over the N x N matrix (each pair computed once, both
   orientations used) keeps per row only its max and its k nearest neighbours (ties broken by
   index, like a stable argsort), and writes the query x gallery block of the output.
2. R(i) = the k1-reciprocal neighbours of i among its k1+1 nearest (self included); each
   c in R(i) whose round(k1/2)-reciprocal set R'(c) shares more than 2/3 of itself with R(i)
   adds R'(c). The union E(i) gets weights exp(-d_ij), normalised to sum 1: row i of V.
3. Local query expansion: V_i <- the mean of V over i's k2 nearest (self included), k2 > 1.
4. Jaccard distance of query i to gallery g: 1 - s/(2 - s) with s = sum_j min(V_ij, V_gj)
   (pairs with disjoint support get 1), via an inverted index over V's gallery rows.
5. Output (1 - lambda) * jaccard + lambda * d, query x gallery, float32.

V is sparse (scipy CSR) and stored in float32; the original stores V in float16, which only
costs precision, so results agree with it to float16 rounding (~1e-3) and with the exact
algorithm to float32 rounding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from strongreid.errors import StrongReIDError
from strongreid.evaluation.distance import (
    as_features,
    feature_pair,
    resolve_device,
    serial_cpu,
    squared_norms,
)
from strongreid.evaluation.selection import (
    ragged_arange,
    sparse_nonzero,
    split_value_index_keys,
    value_index_keys,
)

_PAD = torch.iinfo(torch.int64).max
# Rows per block of the N x N pass: large enough for an efficient GEMM; the diagonal blocks
# (computed whole although symmetric) cost block/N extra.
_BLOCK = 2048
# Columns of a diagonal block probed for each row's first neighbour bound.
_SEED_COLUMNS = 512
# Cells of the per-step membership bitmap (rows x N) of the neighbour-set expansion.
_SET_CELLS = 1 << 26
# Pair distances computed from features per step (pairs x dim floats gathered twice).
_PAIR_STEP = 1024
# (query, gallery, shared column) triples expanded per step of the Jaccard sums.
_TRIPLE_BUDGET = 1 << 23
# Cells of the dense scratch that sums the Jaccard minima of a block of queries.
_SCRATCH_CELLS = 1 << 24


def _check_params(k1: int, k2: int, lambda_value: float) -> None:
    for name, v in (("k1", k1), ("k2", k2)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise StrongReIDError(
                f"re-ranking {name} must be a positive integer (TEST.RE_RANKING_{name.upper()}), "
                f"got {v!r}"
            )
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise StrongReIDError(
            f"re-ranking lambda must be in [0, 1] (TEST.RE_RANKING_LAMBDA), got {lambda_value!r}"
        )


class _Knn:
    """Running exact k nearest neighbours (as sorted value/index keys) and row maxima."""

    def __init__(self, n: int, k: int, device: torch.device) -> None:
        self.k = k
        self.keys = torch.full((n, k), _PAD, dtype=torch.int64, device=device)
        self.bound = torch.full((n,), math.inf, dtype=torch.float32, device=device)
        self.row_max = torch.full((n,), -math.inf, dtype=torch.float32, device=device)

    def offer(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
        """Merge candidate (row, col, value) entries into the rows' neighbour lists."""
        if rows.numel() == 0:
            return
        order = torch.sort(rows, stable=True).indices
        rows, keys = rows[order], value_index_keys(values[order], cols[order])
        touched, counts = torch.unique_consecutive(rows, return_counts=True)
        local = torch.repeat_interleave(torch.arange(touched.shape[0], device=rows.device), counts)
        width = int(counts.max())
        extra = torch.full((touched.shape[0], width), _PAD, dtype=torch.int64, device=rows.device)
        extra[local, ragged_arange(counts)] = keys
        merged = torch.sort(torch.cat([self.keys[touched], extra], dim=1), dim=1).values[:, : self.k]
        self.keys[touched] = merged
        kth = merged[:, -1]
        kth_value, _ = split_value_index_keys(kth)
        self.bound[touched] = torch.where(kth == _PAD, math.inf, kth_value)


def _neighbours(
    x: torch.Tensor, num_q: int, k: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocked pass over all pairs: (neighbour indices n x k, their raw distances, row maxima,
    query x gallery raw distances on the CPU)."""
    n = x.shape[0]
    dev = x.device
    sq = squared_norms(x)
    if not bool(torch.isfinite(sq).all()):
        raise StrongReIDError(
            "re-ranking features are too large: their squared norms overflow float32; "
            "L2-normalise them (TEST.FEAT_NORM yes)"
        )
    knn = _Knn(n, k, dev)
    qg = torch.empty(num_q, n - num_q, dtype=torch.float32)
    starts = list(range(0, n, block))

    buffer = torch.empty(block, block, dtype=torch.float32, device=dev)

    def distances(a0: int, a1: int, b0: int, b1: int) -> torch.Tensor:
        # The original's formula and order: (||a||^2 + ||b||^2) - 2 a.b, float32, no clamp.
        out = buffer[: a1 - a0, : b1 - b0]
        torch.add(sq[a0:a1, None], sq[None, b0:b1], out=out)
        return out.addmm_(x[a0:a1], x[b0:b1].t(), alpha=-2.0)

    def keep_query_gallery(blk: torch.Tensor, a0: int, a1: int, b0: int, b1: int) -> None:
        r1, c0 = min(a1, num_q), max(b0, num_q)
        if a0 < r1 and c0 < b1:
            qg[a0:r1, c0 - num_q : b1 - num_q] = blk[: r1 - a0, c0 - b0 :].cpu()

    def offer_rows(blk: torch.Tensor, a0: int, b0: int) -> None:
        mask = blk <= knn.bound[a0 : a0 + blk.shape[0], None]
        r, c, _ = sparse_nonzero(mask.view(torch.uint8))
        knn.offer(r + a0, c + b0, blk[r, c])

    def offer_both(blk: torch.Tensor, a0: int, b0: int) -> None:
        # One scan of the union of both masks, then split the few candidates.
        row_bound = knn.bound[a0 : a0 + blk.shape[0]]
        col_bound = knn.bound[b0 : b0 + blk.shape[1]]
        mask = blk <= row_bound[:, None]
        mask |= blk <= col_bound[None, :]
        r, c, _ = sparse_nonzero(mask.view(torch.uint8))
        v = blk[r, c]
        for_rows, for_cols = v <= row_bound[r], v <= col_bound[c]
        knn.offer(r[for_rows] + a0, c[for_rows] + b0, v[for_rows])
        knn.offer(c[for_cols] + b0, r[for_cols] + a0, v[for_cols])

    # Diagonal blocks first: the k-th smallest of any k or more of a row's entries bounds its
    # true k-th smallest, so every later block only offers the few entries under that bound.
    # A probe of the block's first columns gives it cheaply.
    # (The GEMMs use every thread; the bookkeeping runs on one, see `serial_cpu`.)
    probe = max(k, _SEED_COLUMNS)
    for a0 in starts:
        a1 = min(n, a0 + block)
        blk = distances(a0, a1, a0, a1)
        with serial_cpu(dev):
            knn.row_max[a0:a1] = blk.amax(dim=1)
            if a1 - a0 >= k:
                seen = blk[:, :probe]
                kth = torch.topk(seen, k, dim=1, largest=False, sorted=False).values.amax(1)
                knn.bound[a0:a1] = kth
            offer_rows(blk, a0, a0)
            keep_query_gallery(blk, a0, a1, a0, a1)
    for i, a0 in enumerate(starts):
        a1 = min(n, a0 + block)
        for b0 in starts[i + 1 :]:
            b1 = min(n, b0 + block)
            blk = distances(a0, a1, b0, b1)
            with serial_cpu(dev):
                knn.row_max[a0:a1] = torch.maximum(knn.row_max[a0:a1], blk.amax(dim=1))
                knn.row_max[b0:b1] = torch.maximum(knn.row_max[b0:b1], blk.amax(dim=0))
                offer_both(blk, a0, b0)
                keep_query_gallery(blk, a0, a1, b0, b1)
    values, index = split_value_index_keys(knn.keys)
    return index, values, knn.row_max, qg


def _reciprocal(lists: torch.Tensor) -> torch.Tensor:
    """mask[i, t]: i is itself in the list of its t-th neighbour lists[i, t] (same width)."""
    n, width = lists.shape
    rows = torch.arange(n, device=lists.device)[:, None].expand(n, width)
    forward = torch.sort((rows * n + lists).reshape(-1)).values
    backward = (lists * n + rows).reshape(-1)
    at = torch.searchsorted(forward, backward).clamp_max(forward.shape[0] - 1)
    return (forward[at] == backward).view(n, width)


def _expansion_pairs(fwd: torch.Tensor, recip: torch.Tensor, k1: int) -> torch.Tensor:
    """Sorted unique keys i * N + j of every j in E(i), the expanded k-reciprocal set of i."""
    n, kk = fwd.shape
    dev = fwd.device
    # np.around rounds half to even, like Python's round.
    half = fwd[:, : min(round(k1 / 2) + 1, kk)]
    recip_half = _reciprocal(half)
    half_size = recip_half.sum(dim=1)
    step = max(1, min(n, _SET_CELLS // n))
    # Row-local membership bitmap of R(i), set and cleared per step (never refilled whole).
    member_of = torch.zeros(step, n, dtype=torch.bool, device=dev)
    pieces = []
    for s in range(0, n, step):
        e = min(n, s + step)
        f, rf = fwd[s:e], recip[s:e]
        local = torch.arange(e - s, device=dev)[:, None].expand_as(f)
        member_of[local[rf], f[rf]] = True
        members = half[f]  # b x kk x kh: R'(c) candidates of each neighbour c
        member_ok = recip_half[f] & rf[:, :, None]
        inside = member_of[local[:, :, None].expand_as(members), members]
        member_of[local[rf], f[rf]] = False
        shared = (inside & member_ok).sum(dim=2)
        take = rf & (3 * shared > 2 * half_size[f])  # |R'(c) & R(i)| > 2/3 |R'(c)|
        pieces.append((local[rf] + s) * n + f[rf])
        grow = member_ok & take[:, :, None] & ~inside
        pieces.append((local[:, :, None].expand_as(members)[grow] + s) * n + members[grow])
    return torch.unique(torch.cat(pieces))


def _pair_distances(
    x: torch.Tensor,
    sq: torch.Tensor,
    pair_keys: torch.Tensor,
    index: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """Raw distances of the pairs i * N + j: from the kept neighbour lists where the pair is
    in them (nearly always), else computed from the features."""
    n = x.shape[0]
    list_keys = (torch.arange(n)[:, None] * n + index).reshape(-1)
    order = torch.sort(list_keys).indices
    list_keys, list_vals = list_keys[order], values.reshape(-1)[order]
    at = torch.searchsorted(list_keys, pair_keys).clamp_max(list_keys.shape[0] - 1)
    found = list_keys[at] == pair_keys
    out = torch.where(found, list_vals[at], 0.0)
    missing = torch.nonzero(~found).squeeze(1)
    rows, cols = pair_keys[missing] // n, pair_keys[missing] % n
    for s in range(0, missing.shape[0], _PAIR_STEP):
        r, c = rows[s : s + _PAIR_STEP], cols[s : s + _PAIR_STEP]
        out[missing[s : s + _PAIR_STEP]] = sq[r] + sq[c] - 2.0 * (x[r] * x[c]).sum(dim=1)
    return out


def _inverted_index(vq: sp.csr_matrix, vg: sp.csr_matrix) -> tuple[torch.Tensor, ...]:
    """CSC arrays of the gallery rows (col_ptr, col_rows, col_vals, col_len), CSR arrays of the
    query rows (ptr, cols, vals, row of each entry) and the cumulative count of the (query,
    gallery, shared column) triples each query row expands to."""
    vc = vg.tocsc()
    col_ptr = torch.from_numpy(vc.indptr.astype(np.int64))
    col_rows = torch.from_numpy(vc.indices.astype(np.int64))
    col_vals = torch.from_numpy(vc.data.astype(np.float32))
    col_len = col_ptr[1:] - col_ptr[:-1]
    q_ptr = torch.from_numpy(vq.indptr.astype(np.int64))
    q_cols = torch.from_numpy(vq.indices.astype(np.int64))
    q_vals = torch.from_numpy(vq.data.astype(np.float32))
    num_q = vq.shape[0]
    q_row = torch.repeat_interleave(torch.arange(num_q), q_ptr[1:] - q_ptr[:-1])
    work = torch.zeros(num_q, dtype=torch.int64).index_add_(0, q_row, col_len[q_cols])
    return col_ptr, col_rows, col_vals, col_len, q_ptr, q_cols, q_vals, q_row, torch.cumsum(work, 0)


def _jaccard_blend(
    v: sp.csr_matrix, num_q: int, dist: torch.Tensor, scale: torch.Tensor, lambda_value: float
) -> None:
    """dist[q] <- (1 - lambda) * jaccard(q, gallery) + lambda * dist[q] / scale[q], in place.

    jaccard = 1 - s/(2 - s) is 1 wherever the supports are disjoint (s = 0), so the dense
    work is dist * lambda/scale + (1 - lambda) over the whole block, and only pairs that share
    a column of V get the correction -(1 - lambda) * s/(2 - s).
    """
    num_g = dist.shape[1]
    col_ptr, col_rows, col_vals, col_len, q_ptr, q_cols, q_vals, q_row, cum = _inverted_index(
        v[:num_q], v[num_q:])
    dist.mul_((lambda_value / scale)[:, None]).add_(1.0 - lambda_value)
    flat = dist.view(-1)
    rows_cap = max(1, _SCRATCH_CELLS // num_g)
    scratch = torch.zeros(min(num_q, rows_cap) * num_g, dtype=torch.float32)
    start = 0
    while start < num_q:
        # As many queries as fit the triple budget and the scratch rows (at least one).
        limit = (int(cum[start - 1]) if start else 0) + _TRIPLE_BUDGET
        stop = max(start + 1, int(torch.searchsorted(cum, limit, right=True)))
        stop = min(stop, num_q, start + rows_cap)
        p0, p1 = int(q_ptr[start]), int(q_ptr[stop])
        j, a = q_cols[p0:p1], q_vals[p0:p1]
        reps = col_len[j]
        which = torch.repeat_interleave(torch.arange(j.shape[0]), reps)
        at = torch.repeat_interleave(col_ptr[j], reps) + ragged_arange(reps)
        cell = (q_row[p0:p1][which] - start) * num_g + col_rows[at]
        scratch.index_add_(0, cell, torch.minimum(a[which], col_vals[at]))
        shared = scratch[cell]
        scratch[cell] = 0.0
        # Repeated cells compute the same value, so the unordered writes agree.
        cell += start * num_g
        flat[cell] = flat[cell] - (1.0 - lambda_value) * shared / (2.0 - shared)
        start = stop


def re_ranking(
    q_feats: Any,
    g_feats: Any,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    block_size: int | None = None,
    device: Any = None,
) -> np.ndarray:
    """Re-ranked query x gallery distances (float32 numpy), the original project's algorithm.

    The distance pass runs on `device` (default: where `q_feats` lives); the sparse steps run
    on the CPU. Memory is O(N * k1^2 + nnz(V) + Q * G), never O(N^2).
    """
    _check_params(k1, k2, lambda_value)
    q, g = feature_pair(q_feats, g_feats, device)
    num_q = q.shape[0]
    x = torch.cat([q, g])
    del q, g
    n = x.shape[0]
    k1, k2 = int(k1), int(k2)
    kk, kq = min(k1 + 1, n), min(k2, n)
    block = int(block_size) if block_size else _BLOCK
    # A longer list than the k1+1 the algorithm reads: the distances of nearly every pair of
    # the expanded sets are then known from the pass instead of recomputed from the features
    # (at Market scale 1.5 x (k1+1) covers 99.8% of them).
    index, raw, row_max, qg = _neighbours(x, num_q, min(n, max(kk, kq) + kk // 2), block)

    with serial_cpu(torch.device("cpu")):
        return _encode_and_blend(x, num_q, k1, k2, kk, kq, float(lambda_value), index, raw,
                                 row_max, qg)


def _encode_and_blend(
    x: torch.Tensor,
    num_q: int,
    k1: int,
    k2: int,
    kk: int,
    kq: int,
    lambda_value: float,
    index: torch.Tensor,
    raw: torch.Tensor,
    row_max: torch.Tensor,
    qg: torch.Tensor,
) -> np.ndarray:
    """Steps 2-5 of the module docstring, from the neighbour lists of step 1."""
    # Rows whose maximum is not positive (all features identical) are left unscaled.
    scale = torch.where(row_max > 0, row_max, torch.ones_like(row_max))
    # Order each list by the normalised value as the original's argsort does (the division
    # can merge nearly equal distances into ties, which then go by index).
    normed = raw / scale[:, None]
    order = torch.sort(value_index_keys(normed, index), dim=1).indices
    index, raw = torch.gather(index, 1, order).cpu(), torch.gather(raw, 1, order).cpu()

    x_cpu, scale_cpu = x.cpu(), scale.cpu()
    del x, normed
    v = _k_reciprocal_vectors(x_cpu, index, raw, scale_cpu, k1, k2, kk, kq)
    _jaccard_blend(v, num_q, qg, scale_cpu[:num_q], lambda_value)
    return qg.numpy()


def _k_reciprocal_vectors(
    x: torch.Tensor,
    index: torch.Tensor,
    raw: torch.Tensor,
    scale: torch.Tensor,
    k1: int,
    k2: int,
    kk: int,
    kq: int,
) -> sp.csr_matrix:
    """Steps 2-3 of the module docstring: the rows V_i (CPU tensors in, CSR out), from neighbour
    lists sorted nearest first."""
    n = x.shape[0]
    sq = squared_norms(x)
    fwd = index[:, :kk]
    pair_keys = _expansion_pairs(fwd, _reciprocal(fwd), k1)
    rows, cols = pair_keys // n, pair_keys % n
    weight = torch.exp(-_pair_distances(x, sq, pair_keys, index, raw) / scale[rows])
    total = torch.zeros(n, dtype=torch.float32).index_add_(0, rows, weight)
    weight /= total[rows]
    counts = torch.bincount(rows, minlength=n)
    indptr = np.concatenate([[0], np.cumsum(counts.numpy())])
    v = sp.csr_matrix((weight.numpy(), cols.numpy(), indptr), shape=(n, n))
    if k2 != 1:
        near = index[:, :kq].numpy().ravel()
        mean_op = sp.csr_matrix(
            (np.full(n * kq, 1.0 / kq, dtype=np.float32), near, np.arange(0, n * kq + 1, kq)),
            shape=(n, n),
        )
        v = (mean_op @ v).tocsr()
        v.sort_indices()
    return v


def jaccard_graph(
    feats: Any,
    *,
    k1: int = 30,
    k2: int = 6,
    block_size: int | None = None,
    device: Any = None,
) -> sp.csr_matrix:
    """k-reciprocal Jaccard distances among all rows of `feats`, as a sparse N x N matrix.

    The distance clustering-based unsupervised ReID feeds to DBSCAN (cluster-contrast's
    `compute_jaccard_distance`): neighbours by squared Euclidean distance (2 - 2 cos for
    normalised features), V weights exp(-d) over the expanded k-reciprocal set with no
    per-row scaling, query expansion over the k2 nearest, 1 - s/(2 - s). Only pairs whose
    supports share a column are stored (the diagonal always, at 0); every other pair is at
    distance 1. Memory is O(N * k1^2 + stored pairs), never O(N^2).
    """
    _check_params(k1, k2, 0.0)
    x = as_features(feats, "feats", resolve_device(device, feats))
    n = x.shape[0]
    k1, k2 = int(k1), int(k2)
    # cluster-contrast searches k1 neighbours (self included), not k1 + 1 as re-ranking does.
    kk, kq = min(k1, n), min(k2, n)
    block = int(block_size) if block_size else _BLOCK
    index, raw, _, _ = _neighbours(x, 0, min(n, max(kk, kq) + kk // 2), block)
    with serial_cpu(torch.device("cpu")):
        order = torch.sort(value_index_keys(raw, index), dim=1).indices
        index, raw = torch.gather(index, 1, order).cpu(), torch.gather(raw, 1, order).cpu()
        # Duplicated features give distances of -1e-7 or so: the exponent must not exceed 0.
        raw.clamp_(min=0.0)
        v = _k_reciprocal_vectors(x.cpu(), index, raw, torch.ones(n), k1, k2, kk, kq)
        return _jaccard_pairs(v)


def _jaccard_pairs(v: sp.csr_matrix) -> sp.csr_matrix:
    """1 - s/(2 - s), s_ij = sum_c min(V_ic, V_jc), for every pair sharing a column of V."""
    n = v.shape[0]
    col_ptr, col_rows, col_vals, col_len, r_ptr, r_cols, r_vals, r_row, cum = _inverted_index(v, v)
    keys_out, vals_out = [], []
    start = 0
    while start < n:
        limit = (int(cum[start - 1]) if start else 0) + _TRIPLE_BUDGET
        stop = min(n, max(start + 1, int(torch.searchsorted(cum, limit, right=True))))
        p0, p1 = int(r_ptr[start]), int(r_ptr[stop])
        j, a = r_cols[p0:p1], r_vals[p0:p1]
        reps = col_len[j]
        which = torch.repeat_interleave(torch.arange(j.shape[0]), reps)
        at = torch.repeat_interleave(col_ptr[j], reps) + ragged_arange(reps)
        keys = r_row[p0:p1][which] * n + col_rows[at]
        pairs, inverse = torch.unique(keys, return_inverse=True)
        shared = torch.zeros(pairs.shape[0]).index_add_(0, inverse, torch.minimum(a[which], col_vals[at]))
        keys_out.append(pairs)
        vals_out.append((1.0 - shared / (2.0 - shared)).clamp_(min=0.0))
        start = stop
    keys = torch.cat(keys_out)
    rows, cols = (keys // n).numpy(), (keys % n).numpy()
    counts = np.bincount(rows, minlength=n)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return sp.csr_matrix((torch.cat(vals_out).numpy(), cols, indptr), shape=(n, n))
