"""Evaluation driven by the TEST.* config keys, and the ranking.npz result file."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from strongreid.errors import StrongReIDError
from strongreid.evaluation.distance import feature_pair, l2_normalize
from strongreid.evaluation.metrics import EvalResult, evaluate, evaluate_features
from strongreid.evaluation.query_expansion import query_expansion
from strongreid.evaluation.reranking import re_ranking
from strongreid.paths import atomic_write


def evaluate_from_config(
    cfg: Any,
    q_feats: Any,
    g_feats: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    *,
    device: Any = None,
) -> dict[str, EvalResult]:
    """{"plain": result} plus "reranked" when TEST.RE_RANKING is 'yes'.

    Order of operations: TEST.FEAT_NORM (L2, eps 1e-12), then TEST.QUERY_EXPANSION (the
    expanded queries are normalised again when FEAT_NORM is on), then TEST.METRIC for the
    plain distances; re-ranking always uses the squared Euclidean distance of the same
    features, as the original does. Each result carries the top-min(TEST.MAX_RANK, G) ranked
    list per query (`topk_index`, `topk_dist`) for `save_ranking`. TEST.FLIP_AUG is applied
    by the feature extractor: the features given here are already averaged.
    """
    from strongreid.config import flag

    test = cfg.TEST
    q, g = feature_pair(q_feats, g_feats, device)
    feat_norm = flag(test.FEAT_NORM)
    if feat_norm:
        q, g = l2_normalize(q), l2_normalize(g)
    if flag(test.QUERY_EXPANSION):
        q = query_expansion(q, g, k=test.QE_K, alpha=test.QE_ALPHA)
        if feat_norm:
            q = l2_normalize(q)
    options = {"max_rank": test.MAX_RANK, "ap": test.AP, "unmatched": test.UNMATCHED,
               "cuhk03": bool(test.CUHK03_METRIC), "seed": int(cfg.SOLVER.SEED)}
    topk = min(int(test.MAX_RANK), g.shape[0])
    labels = (q_pids, g_pids, q_camids, g_camids)
    results = {
        "plain": evaluate_features(q, g, *labels, metric=test.METRIC, topk=topk, **options)
    }
    if flag(test.RE_RANKING):
        dist = re_ranking(
            q, g, k1=test.RE_RANKING_K1, k2=test.RE_RANKING_K2, lambda_value=test.RE_RANKING_LAMBDA
        )
        results["reranked"] = evaluate(dist, *labels, topk=topk, **options)
    return results


def _as_str_array(values: Any, name: str, size: int) -> np.ndarray:
    arr = np.asarray([str(v) for v in values])
    if arr.shape != (size,):
        raise StrongReIDError(f"{name} has {len(arr)} entries, expected {size} (one per image)")
    return arr


def _as_int_array(values: Any, name: str, size: int) -> np.ndarray:
    arr = values.cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if arr.shape != (size,) or arr.dtype.kind not in "iu":
        raise StrongReIDError(f"{name} must be {size} integers, got shape {arr.shape} {arr.dtype}")
    return arr.astype(np.int64)


def save_ranking(
    path: str,
    result: EvalResult,
    q_paths: Any,
    g_paths: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
) -> None:
    """Write ranking.npz (the layout in docs/ARCHITECTURE.md), atomically.

    `topk_index[q]` lists the gallery indices of query q's ranked list with junk (same pid and
    camera) removed, -1 past its end; `topk_dist` the distances (inf past the end).
    """
    if result.topk_index is None or result.topk_dist is None:
        raise StrongReIDError(
            "this result has no ranked lists; evaluate with topk > 0 (evaluate_from_config does)"
        )
    num_q, num_g = result.num_query, result.num_gallery
    arrays = {
        "q_paths": _as_str_array(q_paths, "q_paths", num_q),
        "g_paths": _as_str_array(g_paths, "g_paths", num_g),
        "q_pids": _as_int_array(q_pids, "q_pids", num_q),
        "g_pids": _as_int_array(g_pids, "g_pids", num_g),
        "q_camids": _as_int_array(q_camids, "q_camids", num_q),
        "g_camids": _as_int_array(g_camids, "g_camids", num_g),
        "topk_index": result.topk_index.astype(np.int64),
        "topk_dist": result.topk_dist.astype(np.float32),
        "ap": result.ap.astype(np.float64),
        "cmc": result.cmc.astype(np.float64),
    }
    # A file object: np.savez would append .npz to a name that lacks it.
    atomic_write(path, lambda fh: np.savez(fh, **arrays))
