"""Evaluation: exact CMC / mAP / mINP, k-reciprocal re-ranking, query expansion.

`retrieval` (faiss index and search) is imported on its own, so evaluation never needs faiss.
"""

from strongreid.evaluation.distance import l2_normalize, pairwise_distance
from strongreid.evaluation.metrics import EvalResult, evaluate, evaluate_features
from strongreid.evaluation.multi_query import multi_query_features
from strongreid.evaluation.pipeline import evaluate_from_config, save_ranking
from strongreid.evaluation.query_expansion import query_expansion
from strongreid.evaluation.reranking import re_ranking

__all__ = [
    "EvalResult",
    "evaluate",
    "evaluate_features",
    "evaluate_from_config",
    "l2_normalize",
    "multi_query_features",
    "pairwise_distance",
    "query_expansion",
    "re_ranking",
    "save_ranking",
]
