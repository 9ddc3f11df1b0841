"""Weight averaging over the last part of training (SOLVER.WA), layumi's `--wa`.

layumi (train.py) wraps the model in `torch.optim.swa_utils.AveragedModel` with an EMA of decay
0.996 from epoch 0.8 x total on, updates it once per epoch, recomputes the BN statistics with
`update_bn` on the training loader and saves the result beside the last model. 'swa' is the
equal-weight mean of the same snapshots (Izmailov et al.). The averaged model is written to
OUTPUT_DIR/averaged.pt, a strongreid checkpoint that `strongreid test TEST.WEIGHT` reads.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.optim import swa_utils
from yacs.config import CfgNode

from strongreid.modeling.checkpoint import save_checkpoint

logger = logging.getLogger(__name__)


def first_averaged_epoch(max_epochs: int, start: float) -> int:
    """1-based epoch of the first update: layumi's 0-based `epoch >= start * max_epochs`."""
    return min(max_epochs, math.ceil(start * max_epochs) + 1)


class WeightAveraging:
    """Holds the AveragedModel; `update(epoch, model)` after each epoch, `finalize` at the end."""

    def __init__(self, cfg: CfgNode) -> None:
        self.mode = cfg.SOLVER.WA
        self.decay = float(cfg.SOLVER.WA_EMA_DECAY)
        self.first = first_averaged_epoch(cfg.SOLVER.MAX_EPOCHS, cfg.SOLVER.WA_START)
        self.averaged: swa_utils.AveragedModel | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def _wrap(self, model: nn.Module) -> swa_utils.AveragedModel:
        if self.mode == "ema":
            return swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(self.decay))
        return swa_utils.AveragedModel(model)  # equal-weight running mean (SWA)

    def update(self, epoch: int, model: nn.Module) -> None:
        if not self.enabled or epoch < self.first:
            return
        if self.averaged is None:
            self.averaged = self._wrap(model)
            logger.info("weight averaging (%s) starts at epoch %d", self.mode, epoch)
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, Any]:
        """What last.pt keeps so that a resumed run continues the same average."""
        return {} if self.averaged is None else {"averaged": self.averaged.state_dict()}

    def load_state_dict(self, ckpt: dict[str, Any], model: nn.Module) -> None:
        if self.enabled and "averaged" in ckpt:
            self.averaged = self._wrap(model)
            self.averaged.load_state_dict(ckpt["averaged"])

    @torch.no_grad()
    def finalize(self, loader, device: torch.device) -> nn.Module | None:
        """The averaged model with BN statistics recomputed on `loader` (None when off/unused)."""
        if self.averaged is None:
            return None
        module = self.averaged.module

        def images():
            for batch in loader:
                yield batch[0].to(device, non_blocking=True)

        swa_utils.update_bn(images(), module, device=None)
        return module.eval()


def save_averaged(path: Path, state: dict[str, Any], module: nn.Module) -> None:
    """averaged.pt: the last checkpoint's metadata with the averaged weights as `model`."""
    out = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "averaged",
                                                        "center_optimizer", "scaler")}
    out["model"] = module.state_dict()
    out["weight_averaging"] = True
    save_checkpoint(out, path)
