"""Which loss terms a config asks for, and the combinations that cannot train (one message each).

Shared by `validate` (load time) and `build_loss` (which may get a hand-built config), so both
reject the same things with the same words. Needs no torch.
"""

from __future__ import annotations

from yacs.config import CfgNode

from strongreid.errors import ConfigError

# MODEL.ID_LOSS_TYPE: 'softmax' is the bias-free classifier + (label-smoothing) cross-entropy of
# the original; the others swap in a cosine classifier and add their margin before the softmax.
ID_LOSS_TYPES = ("softmax", "arcface", "cosface", "sphereface", "circle")
# Metric terms on the (pre-BN) features, in MODEL.METRIC_LOSS_TYPE, comma-separated to combine.
PAIR_TERMS = ("triplet", "circle", "contrastive", "lifted", "instance", "wrt")
METRIC_TOKENS = PAIR_TERMS + ("center", "triplet_center")
SAMPLERS = ("softmax", "triplet", "softmax_triplet")
# The weight key of each metric term (the triplet's is the original extension key).
WEIGHT_KEYS = {
    "triplet": "TRIPLET_LOSS_WEIGHT",
    "circle": "CIRCLE_LOSS_WEIGHT",
    "contrastive": "CONTRASTIVE_LOSS_WEIGHT",
    "lifted": "LIFTED_LOSS_WEIGHT",
    "instance": "INSTANCE_LOSS_WEIGHT",
    "wrt": "WRT_LOSS_WEIGHT",
}


def metric_tokens(value: str) -> list[str]:
    """'triplet_center' -> ['triplet', 'center']; 'circle, triplet' -> ['circle', 'triplet']."""
    tokens: list[str] = []
    for raw in str(value).replace("+", ",").split(","):
        tok = raw.strip().lower()
        if not tok:
            continue
        if tok not in METRIC_TOKENS:
            raise ConfigError(
                f"MODEL.METRIC_LOSS_TYPE = {value!r}: unknown term {tok!r}; choose from "
                f"{', '.join(map(repr, METRIC_TOKENS))} (comma-separated to combine, e.g. 'triplet,circle')."
            )
        for t in (["triplet", "center"] if tok == "triplet_center" else [tok]):
            if t in tokens:
                raise ConfigError(f"MODEL.METRIC_LOSS_TYPE = {value!r} names {t!r} twice.")
            tokens.append(t)
    if not tokens:
        raise ConfigError("MODEL.METRIC_LOSS_TYPE is empty: use 'triplet' (the original) or another term.")
    return tokens


def pair_terms(cfg: CfgNode) -> list[str]:
    """The feature terms that train (in the config's order), after check_losses: none on the
    shuffled 'softmax' loader, where the original trains the ID loss (and center) only."""
    tokens = [t for t in metric_tokens(cfg.MODEL.METRIC_LOSS_TYPE) if t != "center"]
    if cfg.DATALOADER.SAMPLER == "softmax":
        return []
    return tokens


def check_losses(cfg: CfgNode) -> None:
    """Reject loss settings that cannot train; the four original configs pass unchanged."""
    from strongreid.config.loader import flag  # loader imports this module at its top

    sampler = cfg.DATALOADER.SAMPLER
    if sampler not in SAMPLERS:
        raise ConfigError(f"DATALOADER.SAMPLER = {sampler!r}: use 'softmax', 'triplet' or 'softmax_triplet'.")
    id_type = cfg.MODEL.ID_LOSS_TYPE
    if id_type not in ID_LOSS_TYPES:
        raise ConfigError(
            f"MODEL.ID_LOSS_TYPE = {id_type!r} is not allowed; choose one of {', '.join(map(repr, ID_LOSS_TYPES))}."
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
        key = WEIGHT_KEYS[term]
        if cfg.SOLVER[key] < 0:
            raise ConfigError(f"SOLVER.{key} = {cfg.SOLVER[key]} must be >= 0.")
