"""The loss zoo: which terms a config asks for, the combinations that cannot train, and the
modules that compute them (MODEL.ID_LOSS_TYPE, MODEL.METRIC_LOSS_TYPE; docs/losses.md).

`check_losses` runs when a config is validated and again in `build_loss` (which may get a
hand-built config), so both reject the same things with the same words.
"""

from __future__ import annotations

import torch.nn as nn
from yacs.config import CfgNode

from strongreid.config import flag
from strongreid.config.components import check_choices, config_check, lookup, selects
from strongreid.data.build import SAMPLERS
from strongreid.errors import ConfigError
from strongreid.losses import (  # noqa: F401  (register)
    classification,
    cluster_memory,
    instance,
    margin,
    pairwise,
    triplet,
)
from strongreid.losses.registry import ID_LOSSES, PAIR_LOSSES

# MODEL.METRIC_LOSS_TYPE words that are not pair terms: the center loss, and the original's
# 'triplet_center' (= 'triplet,center').
CENTER_TOKENS = ("center", "triplet_center")


def metric_tokens(value: str) -> list[str]:
    """'triplet_center' -> ['triplet', 'center']; 'circle, triplet' -> ['circle', 'triplet']."""
    known = PAIR_LOSSES.names_in_order() + list(CENTER_TOKENS)
    tokens: list[str] = []
    for raw in str(value).replace("+", ",").split(","):
        tok = raw.strip().lower()
        if not tok:
            continue
        if tok not in known:
            raise ConfigError(
                f"MODEL.METRIC_LOSS_TYPE = {value!r}: unknown term {tok!r}; choose from "
                f"{', '.join(map(repr, known))} (comma-separated to combine, e.g. 'triplet,circle')."
            )
        for t in (["triplet", "center"] if tok == "triplet_center" else [tok]):
            if t in tokens:
                raise ConfigError(f"MODEL.METRIC_LOSS_TYPE = {value!r} names {t!r} twice.")
            tokens.append(t)
    if not tokens:
        raise ConfigError("MODEL.METRIC_LOSS_TYPE is empty: use 'triplet' (the original) or another term.")
    return tokens


def _named_pair_terms(cfg: CfgNode) -> list[str]:
    return [t for t in metric_tokens(cfg.MODEL.METRIC_LOSS_TYPE) if t != "center"]


selects("MODEL.METRIC_LOSS_TYPE", PAIR_LOSSES, names=_named_pair_terms)


def pair_terms(cfg: CfgNode) -> list[str]:
    """The feature terms that train (in the config's order), after check_losses: none on the
    shuffled 'softmax' loader, where the original trains the ID loss (and center) only."""
    if cfg.DATALOADER.SAMPLER == "softmax":
        return []
    return _named_pair_terms(cfg)


def weight_key(term: str) -> str:
    """The dotted config key of a pair term's weight."""
    return PAIR_LOSSES.get(term).weight_key


@config_check("losses")
def check_losses(cfg: CfgNode) -> None:
    """Reject loss settings that cannot train; the four original configs pass unchanged."""
    check_choices(cfg, {
        "MODEL.IF_WITH_CENTER": ("yes", "no"),
        "MODEL.IF_LABELSMOOTH": ("on", "off"),
        "SOLVER.CIRCLE_REDUCTION": ("anchor", "batch"),
        "SOLVER.INSTANCE_TARGET": ("image", "layumi"),
    })
    if cfg.SOLVER.MARGIN is not None and cfg.SOLVER.MARGIN < 0:
        raise ConfigError(f"SOLVER.MARGIN = {cfg.SOLVER.MARGIN} must be >= 0 (or None for soft margin).")
    sampler = cfg.DATALOADER.SAMPLER
    if sampler not in SAMPLERS:
        raise ConfigError(f"DATALOADER.SAMPLER = {sampler!r}: use 'softmax', 'triplet' or 'softmax_triplet'.")
    id_type = cfg.MODEL.ID_LOSS_TYPE
    if id_type not in ID_LOSSES:
        raise ConfigError(
            f"MODEL.ID_LOSS_TYPE = {id_type!r} is not allowed; choose one of "
            f"{', '.join(map(repr, ID_LOSSES.names()))}."
        )
    value = cfg.MODEL.METRIC_LOSS_TYPE
    tokens = metric_tokens(value)
    center = flag(cfg.MODEL.IF_WITH_CENTER)
    pairs = [t for t in tokens if t != "center"]
    if center:
        if "center" not in tokens:
            raise ConfigError(
                "MODEL.IF_WITH_CENTER 'yes' needs MODEL.METRIC_LOSS_TYPE 'center' or "
                f"'triplet_center' (or another term with ',center'), not {value!r} (or set IF_WITH_CENTER 'no')."
            )
        if cfg.SOLVER.CENTER_LOSS_WEIGHT <= 0:
            raise ConfigError(
                f"SOLVER.CENTER_LOSS_WEIGHT = {cfg.SOLVER.CENTER_LOSS_WEIGHT} must be positive "
                "with center loss (its gradient is rescaled by 1/weight)."
            )
        if pairs and sampler == "softmax":
            raise ConfigError(
                f"MODEL.METRIC_LOSS_TYPE {value!r} mines pairs, which needs the P x K identity "
                "sampler: set DATALOADER.SAMPLER 'softmax_triplet' (the shuffled 'softmax' loader "
                "gives batches with unequal images per identity)."
            )
    elif "center" in tokens and sampler != "softmax":
        raise ConfigError(
            f"MODEL.METRIC_LOSS_TYPE {value!r} needs MODEL.IF_WITH_CENTER 'yes'; with "
            f"IF_WITH_CENTER 'no' and DATALOADER.SAMPLER {sampler!r} use METRIC_LOSS_TYPE 'triplet' "
            "or another feature term."
        )
    elif sampler == "softmax" and any(t not in ("triplet", "center") for t in tokens):
        # 'triplet' (the default) is ignored on this loader, as in the original; a new term
        # would be silently ignored too, so it is refused.
        raise ConfigError(
            f"MODEL.METRIC_LOSS_TYPE {value!r} is a pair loss: it needs DATALOADER.SAMPLER "
            "'softmax_triplet' (ID + metric loss) or 'triplet' (metric loss only); the shuffled "
            "'softmax' loader trains the ID loss alone."
        )
    if sampler == "triplet" and not center and id_type != "softmax":
        raise ConfigError(
            f"MODEL.ID_LOSS_TYPE {id_type!r} with DATALOADER.SAMPLER 'triplet': that sampler trains "
            "no ID loss; use SAMPLER 'softmax_triplet' to train the margin classifier."
        )
    for term in pairs:
        key = weight_key(term)
        if lookup(cfg, key) < 0:
            raise ConfigError(f"{key} = {lookup(cfg, key)} must be >= 0.")


def build_id_loss(cfg: CfgNode, ce: nn.Module) -> nn.Module:
    """The ID loss of MODEL.ID_LOSS_TYPE around the cross-entropy `ce` ('softmax': `ce` itself)."""
    return ID_LOSSES.get(cfg.MODEL.ID_LOSS_TYPE).from_config(cfg, ce)


def build_pair_term(cfg: CfgNode, name: str) -> nn.Module:
    """The metric term `name` of MODEL.METRIC_LOSS_TYPE with its parameters."""
    return PAIR_LOSSES.get(name).from_config(cfg)
