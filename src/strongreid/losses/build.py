"""The strong baseline's loss: which terms, with which weights, from the original's flags,
plus the loss zoo's margin classifiers and pair losses (docs/losses.md)."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from yacs.config import CfgNode

from strongreid.config import flag
from strongreid.config.components import lookup
from strongreid.errors import ConfigError
from strongreid.losses.center import CenterLoss
from strongreid.losses.classification import CrossEntropyLabelSmooth, CrossEntropyLoss
from strongreid.losses.zoo import (
    build_id_loss,
    build_pair_term,
    check_losses,
    pair_terms,
    weight_key,
)
from strongreid.modeling.outputs import ModelOutput

logger = logging.getLogger(__name__)

_warned_softmax_ls = False


class ReIDLoss(nn.Module):
    """forward(outputs, targets) -> {'id', <metric terms>, 'center' (as configured), 'total'}.

    Every entry is already weighted, so 'total' is their sum and each can be logged on its own.
    `outputs` is the model's ModelOutput: the ID loss sees its `logits` (summed over the parts of
    a part model), the metric and center terms its `features`. The metric terms ('triplet',
    'circle', ...) live in `.metrics` with weights in `.metric_weights`; `gathered=(feats,
    targets)` of all ranks replaces their input.
    """

    def __init__(
        self,
        id_loss: nn.Module | None = None,
        triplet: nn.Module | None = None,
        center: CenterLoss | None = None,
        id_weight: float = 1.0,
        triplet_weight: float = 1.0,
        center_weight: float = 0.0005,
        extra: dict[str, tuple[nn.Module, float]] | None = None,
    ) -> None:
        super().__init__()
        terms = ({"triplet": (triplet, triplet_weight)} if triplet is not None else {}) | (extra or {})
        if id_loss is None and not terms and center is None:
            raise ConfigError("the loss has no term: enable the ID, triplet or center loss")
        self.id_loss = id_loss
        self.metrics = nn.ModuleDict({k: m for k, (m, _) in terms.items()})
        self.metric_weights = {k: float(w) for k, (_, w) in terms.items()}
        self.center = center
        self.id_weight = float(id_weight)
        self.triplet_weight = float(triplet_weight)
        self.center_weight = float(center_weight)

    @property
    def triplet(self) -> nn.Module | None:
        return self.metrics["triplet"] if "triplet" in self.metrics else None

    def forward(
        self, outputs: ModelOutput, targets: torch.Tensor,
        gathered: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        feats = outputs.features
        terms: dict[str, torch.Tensor] = {}
        if self.id_loss is not None:
            terms["id"] = self.id_weight * outputs.sum_over_parts(lambda logits: self.id_loss(logits, targets))
        pair_feats, pair_targets = gathered if gathered is not None else (feats, targets)
        # A multi-branch model's features (Branches) enter each term branch by branch, weighted.
        pairs = ModelOutput(outputs.logits, pair_feats)
        for name, term in self.metrics.items():
            terms[name] = self.metric_weights[name] * pairs.over_features(lambda f, term=term: term(f, pair_targets))
        if self.center is not None:
            terms["center"] = self.center_weight * outputs.over_features(lambda f: self.center(f, targets))
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms


def build_loss(
    cfg: CfgNode, num_classes: int, feat_dim: int, device: torch.device | str | None = None
) -> ReIDLoss:
    """The original's loss for its DATALOADER.SAMPLER, MODEL.METRIC_LOSS_TYPE, MODEL.IF_WITH_CENTER
    and MODEL.IF_LABELSMOOTH (docs/losses.md has the table), with the weights of
    SOLVER.*_LOSS_WEIGHT; MODEL.ID_LOSS_TYPE and the other metric terms from the loss registries."""
    global _warned_softmax_ls
    check_losses(cfg)
    sampler = cfg.DATALOADER.SAMPLER
    with_center = flag(cfg.MODEL.IF_WITH_CENTER)
    smooth = flag(cfg.MODEL.IF_LABELSMOOTH)

    def id_loss(label_smooth: bool) -> nn.Module:
        if label_smooth:
            ce: nn.Module = CrossEntropyLabelSmooth(num_classes, cfg.MODEL.LABEL_SMOOTH_EPSILON)
        else:
            ce = CrossEntropyLoss()
        return build_id_loss(cfg, ce)

    weights = {
        "id_weight": cfg.SOLVER.ID_LOSS_WEIGHT,
        "triplet_weight": cfg.SOLVER.TRIPLET_LOSS_WEIGHT,
        "center_weight": cfg.SOLVER.CENTER_LOSS_WEIGHT,
    }
    extra = {n: (build_pair_term(cfg, n), lookup(cfg, weight_key(n))) for n in pair_terms(cfg)}
    triplet = extra.pop("triplet", (None, 0.0))[0]
    if with_center:
        # As in the original, the sampler chooses the loader but not the loss formula here.
        return ReIDLoss(id_loss(smooth), triplet, CenterLoss(num_classes, feat_dim, device=device),
                        extra=extra, **weights)
    if sampler == "softmax":
        # The original uses plain CE on this path whatever IF_LABELSMOOTH says, and softmax.yml's
        # published numbers were obtained that way. We keep the numbers (plain CE) but no longer
        # keep it silent: a warning says the flag has no effect here.
        if smooth and not _warned_softmax_ls:
            _warned_softmax_ls = True
            logger.warning(
                "MODEL.IF_LABELSMOOTH 'on' is ignored with DATALOADER.SAMPLER 'softmax' (plain "
                "cross-entropy, as reid-strong-baseline); use SAMPLER 'softmax_triplet' for "
                "label smoothing"
            )
        return ReIDLoss(id_loss(False), None, None, **weights)
    if sampler == "triplet":
        return ReIDLoss(None, triplet, None, extra=extra, **weights)
    return ReIDLoss(id_loss(smooth), triplet, None, extra=extra, **weights)
