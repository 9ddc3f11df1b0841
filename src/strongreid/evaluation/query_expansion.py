"""Average query expansion with alpha weights (alpha-QE, Radenovic et al. 2018).

Each query becomes the weighted mean of itself and its k-1 most cosine-similar gallery
features, weight cos^alpha (the query's own weight is 1), as fast-reid's TEST.AQE with its
defaults k=5, alpha=3. Only queries are expanded: fast-reid also expands the gallery over
query+gallery, which needs all pairs (N x N) and uses the other queries as neighbours.
Negative similarities get weight 0 so that any alpha is defined.
"""

from __future__ import annotations

from typing import Any

import torch

from strongreid.errors import StrongReIDError
from strongreid.evaluation.distance import block_rows, feature_pair


def query_expansion(
    q_feats: Any,
    g_feats: Any,
    *,
    k: int = 5,
    alpha: float = 3.0,
    chunk_size: int | None = None,
    device: Any = None,
) -> Any:
    """Expanded query features (float32), numpy or torch (on its device) like `q_feats`."""
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise StrongReIDError(f"query expansion k must be a positive integer (TEST.QE_K), got {k!r}")
    if not float(alpha) >= 0.0:
        raise StrongReIDError(f"query expansion alpha must be >= 0 (TEST.QE_ALPHA), got {alpha!r}")
    q, g = feature_pair(q_feats, g_feats, device)
    dev = q.device
    near = min(int(k) - 1, g.shape[0])
    out = q.clone()
    if near > 0:
        q_inv = 1.0 / q.norm(dim=1).clamp_min(1e-12)
        g_unit_t = (g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)).t()
        rows = block_rows(g.shape[0], dev, chunk_size)
        for s in range(0, q.shape[0], rows):
            sim = torch.mm(q[s : s + rows] * q_inv[s : s + rows, None], g_unit_t)
            top, idx = torch.topk(sim, near, dim=1)
            weight = top.clamp_min(0.0).pow(float(alpha))
            out[s : s + rows] += torch.einsum("bk,bkd->bd", weight, g[idx])
    out /= float(near + 1)
    if isinstance(q_feats, torch.Tensor):
        return out.to(device=q_feats.device)
    return out.cpu().numpy()
