"""Multi-query evaluation (Zheng et al., Market-1501): a query is all its boxes in one camera."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from strongreid.errors import StrongReIDError
from strongreid.evaluation.distance import l2_normalize


def multi_query_features(
    q_feats: torch.Tensor,
    q_pids: Any,
    q_camids: Any,
    mq_feats: torch.Tensor,
    mq_pids: Any,
    mq_camids: Any,
    *,
    normalize: bool = True,
) -> tuple[torch.Tensor, int]:
    """(query features, number of queries that kept their own feature).

    Query i becomes the mean of the multi-query features with its identity and camera (Market's
    gt_bbox boxes, layumi's multi-query/), each L2-normalised first when `normalize` and the
    mean L2-normalised again, the protocol of Market-1501 and of layumi's evaluate_gpu.py (which
    skips the second normalisation: it does not change a single query's ranking). A query with
    no such image keeps its own (normalised) feature; the count of those is returned.
    """
    q = torch.as_tensor(q_feats).float()
    mq = torch.as_tensor(mq_feats).float().to(q.device)
    q_pids, q_camids = np.asarray(q_pids), np.asarray(q_camids)
    mq_pids, mq_camids = np.asarray(mq_pids), np.asarray(mq_camids)
    if mq.ndim != 2 or mq.shape[0] != len(mq_pids) or mq.shape[0] != len(mq_camids):
        raise StrongReIDError(
            f"multi-query features {tuple(mq.shape)} do not fit {len(mq_pids)} pids and "
            f"{len(mq_camids)} camids"
        )
    if q.ndim != 2 or q.shape[0] != len(q_pids) or q.shape[0] != len(q_camids):
        raise StrongReIDError(f"query features {tuple(q.shape)} do not fit {len(q_pids)} pids")
    if mq.shape[0] and mq.shape[1] != q.shape[1]:
        raise StrongReIDError(
            f"multi-query features have dimension {mq.shape[1]}, the queries {q.shape[1]}"
        )
    if normalize:
        q, mq = l2_normalize(q), l2_normalize(mq)
    groups: dict[tuple[int, int], list[int]] = {}
    for index, key in enumerate(zip(mq_pids.tolist(), mq_camids.tolist())):
        groups.setdefault(key, []).append(index)
    means = {key: mq[rows].mean(dim=0) for key, rows in groups.items()}
    out = q.clone()
    fallback = 0
    for i, key in enumerate(zip(q_pids.tolist(), q_camids.tolist())):
        mean = means.get(key)
        if mean is None:
            fallback += 1
        else:
            out[i] = mean
    if normalize:
        out = l2_normalize(out)
    return out, fallback
