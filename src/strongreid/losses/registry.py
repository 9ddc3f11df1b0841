"""The loss registries.

* `ID_LOSSES` (MODEL.ID_LOSS_TYPE): `from_config(cfg, ce) -> nn.Module`, the ID loss on the
  classifier's logits wrapped around the (label-smoothing) cross-entropy `ce`.
* `PAIR_LOSSES` (the terms of MODEL.METRIC_LOSS_TYPE): `nn.Module` classes on (feats, labels)
  with `from_config(cfg)` and `weight_key` (the dotted key of their weight, e.g.
  'SOLVER.CIRCLE_LOSS_WEIGHT').
* `TRIPLET_MINERS` (SOLVER.TRIPLET_MINER): what the 'triplet' term mines with.
* `LOSSES`: every loss module by name, for users composing a loss of their own.

Entries may define `check(cfg)` for the keys they read; it runs when the config selects them.
"""

from __future__ import annotations

from strongreid.config.components import selects
from strongreid.registry import Registry

LOSSES: Registry = Registry("loss")
ID_LOSSES: Registry = Registry("ID loss")
PAIR_LOSSES: Registry = Registry("metric loss term")
TRIPLET_MINERS: Registry = Registry("triplet miner")

selects("MODEL.ID_LOSS_TYPE", ID_LOSSES)
selects("SOLVER.TRIPLET_MINER", TRIPLET_MINERS)
