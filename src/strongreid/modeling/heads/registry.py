"""The head registry: MODEL.HEAD names a model class that puts a head on the backbone.

An entry is a class (an nn.Module) with

    @classmethod
    def from_config(cls, cfg, backbone, num_classes) -> nn.Module   # build it from MODEL.* keys
    @classmethod
    def check(cls, cfg) -> None                                    # optional: its own keys

and the interface of `ReIDModel`: `feat_dim` (test-feature width), `num_classes`, `arch`, and
optionally `class_layers` (parameter prefixes sized by the class count).
"""

from __future__ import annotations

import torch.nn as nn
from yacs.config import CfgNode

from strongreid.config.components import check_choices, config_check, selected, selects
from strongreid.errors import ConfigError
from strongreid.registry import Registry

HEADS: Registry = Registry("head")
selects("MODEL.HEAD", HEADS)


def build_head_model(cfg: CfgNode, backbone: nn.Module, num_classes: int) -> nn.Module:
    """The model of MODEL.HEAD on `backbone`."""
    return selected(cfg, "MODEL.HEAD").from_config(cfg, backbone, num_classes)


@config_check("head")
def check_head_keys(cfg: CfgNode) -> None:
    """The head keys every head shares (pooling, neck, widths, dropout, precision)."""
    check_choices(cfg, {
        "MODEL.NECK": ("bnneck", "no"),
        "MODEL.POOLING": ("avg", "gem"),
        "MODEL.HEAD_PRECISION": ("amp", "fp32"),
        "TEST.NECK_FEAT": ("after", "before"),
        "MODEL.METRIC_FEAT": ("before", "after"),
    })
    m = cfg.MODEL
    if m.LINEAR_NUM < 0:
        raise ConfigError(f"MODEL.LINEAR_NUM = {m.LINEAR_NUM} must be >= 0 (0: no embedding Linear).")
    if m.PCB_LINEAR_NUM < 0:
        raise ConfigError(f"MODEL.PCB_LINEAR_NUM = {m.PCB_LINEAR_NUM} must be >= 0.")
    if not 0.0 <= m.DROPRATE < 1.0:
        raise ConfigError(f"MODEL.DROPRATE = {m.DROPRATE} must lie in [0, 1).")
    if m.PCB_PARTS < 1:
        raise ConfigError(f"MODEL.PCB_PARTS = {m.PCB_PARTS} must be at least 1 (PCB uses 6).")
    if m.HEAD_PRECISION == "fp32" and m.HEAD != "baseline":
        raise ConfigError(
            f"MODEL.HEAD_PRECISION 'fp32' applies to MODEL.HEAD 'baseline' (pooling, BNNeck and "
            f"classifier); MODEL.HEAD is {m.HEAD!r}: set HEAD_PRECISION 'amp'."
        )
