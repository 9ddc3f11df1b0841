"""The TEST.* keys of the evaluation protocol: distance, AP, re-ranking and query expansion."""

from __future__ import annotations

from yacs.config import CfgNode

from strongreid.config.components import check_at_least, check_choices, config_check
from strongreid.errors import ConfigError


@config_check("evaluation")
def check_test_keys(cfg: CfgNode) -> None:
    """TEST.*: the metric, AP and unmatched-query rules, re-ranking and query-expansion sizes."""
    check_choices(cfg, {
        "TEST.RE_RANKING": ("yes", "no"),
        "TEST.FEAT_NORM": ("yes", "no"),
        "TEST.METRIC": ("euclidean", "cosine"),
        "TEST.AP": ("plain", "trapezoid"),
        "TEST.UNMATCHED": ("skip", "fail"),
        "TEST.PRECISION": ("fp32", "amp"),
    })
    if not 0.0 <= cfg.TEST.RE_RANKING_LAMBDA <= 1.0:
        raise ConfigError(f"TEST.RE_RANKING_LAMBDA = {cfg.TEST.RE_RANKING_LAMBDA} must lie in [0, 1].")
    check_at_least(cfg, ("TEST.MAX_RANK", "TEST.RE_RANKING_K1", "TEST.RE_RANKING_K2", "TEST.QE_K"))
    scales = list(cfg.TEST.MULTI_SCALE)
    if not scales or any(float(s) <= 0 for s in scales):
        raise ConfigError(
            f"TEST.MULTI_SCALE = {scales}: give one or more positive scales, e.g. [1.0, 1.1] "
            "(layumi's --ms 1,1.1); [1.0] tests at INPUT.SIZE_TEST only."
        )
