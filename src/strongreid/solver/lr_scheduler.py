"""Epoch-based learning-rate schedules with warm-up: the original's multi-step and a cosine one."""

from __future__ import annotations

import bisect
import math

import torch
from torch.optim.lr_scheduler import LRScheduler
from yacs.config import CfgNode

from strongreid.config.components import check_choices, config_check, selected, selects
from strongreid.errors import ConfigError
from strongreid.registry import Registry

# SOLVER.SCHED -> an epoch scheduler class with `from_config(cfg, optimizer)`.
SCHEDULERS: Registry = Registry("lr schedule")
selects("SOLVER.SCHED", SCHEDULERS)

WARMUP_METHODS = ("constant", "linear")


def warmup_factor_at(t: int, warmup_iters: int, warmup_factor: float, method: str) -> float:
    """1 once t >= W; before: f (constant) or f (1 - t/W) + t/W (linear)."""
    if t >= warmup_iters:
        return 1.0
    if method == "constant":
        return warmup_factor
    alpha = t / warmup_iters
    return warmup_factor * (1.0 - alpha) + alpha


def _check_warmup(method: str, warmup_iters: int) -> None:
    if method not in WARMUP_METHODS:
        raise ConfigError(
            f"SOLVER.WARMUP_METHOD = {method!r}: use one of {', '.join(map(repr, WARMUP_METHODS))}."
        )
    if warmup_iters < 0:
        raise ConfigError(f"SOLVER.WARMUP_ITERS = {warmup_iters} must be >= 0 (epochs).")


class _EpochScheduler(LRScheduler):
    """Closed-form lr(t) = base_lr * self.factor(t) per group (subclasses define `factor`);
    resuming from a state dict also restores the groups' lr."""

    # SOLVER.FREEZE_BACKBONE_EPOCHS: the `backbone` groups train at lr 0 while t < this (SBS).
    freeze_epochs = 0

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        frozen = self.last_epoch < self.freeze_epochs
        return [0.0 if frozen and group.get("backbone") else base * f
                for base, group in zip(self.base_lrs, self.optimizer.param_groups)]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # Put the lr of the restored epoch into the optimiser, whether or not the caller also
        # restores the optimiser's state.
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


@SCHEDULERS.register("multistep")
class WarmupMultiStepLR(_EpochScheduler):
    """lr(t) = base_lr * warmup(t) * gamma^(number of milestones <= t), t counted in epochs.

    Unit: epochs. Step it once per epoch, after the epoch's iterations. Built, it is at t = 0,
    which is epoch 1's lr; so epoch e (1-based) trains with t = e - 1. That is the behaviour the
    authors ran (PyTorch 1.0, whose scheduler stepped at each epoch start): with
    warm-up 10 from 0.01 and milestones 40/70, epoch 1 uses 0.01 x base, epoch 10 0.901 x base,
    epochs 11-40 base, 41-70 base/10 and 71- base/100. Milestones and WARMUP_ITERS are epochs.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: list[int] | tuple[int, ...],
        gamma: float = 0.1,
        warmup_factor: float = 1.0 / 3,
        warmup_iters: int = 500,
        warmup_method: str = "linear",
        last_epoch: int = -1,
    ) -> None:
        milestones = list(milestones)
        if milestones != sorted(milestones):
            raise ConfigError(
                f"SOLVER.STEPS = {milestones}: milestones must be increasing epoch numbers."
            )
        _check_warmup(warmup_method, warmup_iters)
        self.milestones = milestones
        self.gamma = float(gamma)
        self.warmup_factor = float(warmup_factor)
        self.warmup_iters = int(warmup_iters)
        self.warmup_method = warmup_method
        super().__init__(optimizer, last_epoch)

    @classmethod
    def from_config(cls, cfg: CfgNode, optimizer: torch.optim.Optimizer) -> WarmupMultiStepLR:
        """SOLVER.SCHED 'multistep': STEPS, GAMMA and the warm-up keys."""
        s = cfg.SOLVER
        return cls(optimizer, s.STEPS, s.GAMMA, s.WARMUP_FACTOR, s.WARMUP_ITERS, s.WARMUP_METHOD)

    def factor(self, t: int) -> float:
        warm = warmup_factor_at(t, self.warmup_iters, self.warmup_factor, self.warmup_method)
        return warm * self.gamma ** bisect.bisect_right(self.milestones, t)


@SCHEDULERS.register("cosine")
class WarmupCosineLR(_EpochScheduler):
    """Warm-up as WarmupMultiStepLR, then a cosine from base_lr down to base_lr * min_lr_factor.

    Same unit and indexing: epoch e trains with t = e - 1. The cosine runs from t = W (the first
    epoch after warm-up, factor 1) to t = max_epochs - 1 (the last epoch, factor min_lr_factor).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_epochs: int,
        min_lr_factor: float = 0.01,
        warmup_factor: float = 1.0 / 3,
        warmup_iters: int = 0,
        warmup_method: str = "linear",
        last_epoch: int = -1,
        delay_epochs: int = 0,
    ) -> None:
        _check_warmup(warmup_method, warmup_iters)
        if delay_epochs < 0:
            raise ConfigError(f"SOLVER.COSINE_DELAY_EPOCHS = {delay_epochs} must be >= 0.")
        # fast-reid's delayed cosine (SBS): base lr (after warm-up) until t = delay_epochs.
        self.delay_epochs = int(delay_epochs)
        if max_epochs < 1:
            raise ConfigError(f"SOLVER.MAX_EPOCHS = {max_epochs} must be at least 1.")
        if not 0.0 <= min_lr_factor <= 1.0:
            raise ConfigError(f"SOLVER.COSINE_MIN_LR_FACTOR = {min_lr_factor} must lie in [0, 1].")
        self.max_epochs = int(max_epochs)
        self.min_lr_factor = float(min_lr_factor)
        self.warmup_factor = float(warmup_factor)
        self.warmup_iters = int(warmup_iters)
        self.warmup_method = warmup_method
        super().__init__(optimizer, last_epoch)

    @classmethod
    def from_config(cls, cfg: CfgNode, optimizer: torch.optim.Optimizer) -> WarmupCosineLR:
        """SOLVER.SCHED 'cosine': MAX_EPOCHS, COSINE_MIN_LR_FACTOR / DELAY_EPOCHS, the warm-up keys."""
        s = cfg.SOLVER
        return cls(optimizer, s.MAX_EPOCHS, s.COSINE_MIN_LR_FACTOR, s.WARMUP_FACTOR, s.WARMUP_ITERS,
                   s.WARMUP_METHOD, delay_epochs=s.COSINE_DELAY_EPOCHS)

    def factor(self, t: int) -> float:
        if t < self.warmup_iters:
            return warmup_factor_at(t, self.warmup_iters, self.warmup_factor, self.warmup_method)
        # fast-reid counts the delay from the start, warm-up included.
        start = max(self.warmup_iters, self.delay_epochs)
        if t < start:
            return 1.0
        span = self.max_epochs - 1 - start
        progress = 1.0 if span <= 0 else min((t - start) / span, 1.0)
        m = self.min_lr_factor
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> LRScheduler:
    """SOLVER.SCHED 'multistep' (the original) or 'cosine'; both stepped once per epoch."""
    s = cfg.SOLVER
    if s.FREEZE_BACKBONE_EPOCHS < 0:
        raise ConfigError(f"SOLVER.FREEZE_BACKBONE_EPOCHS = {s.FREEZE_BACKBONE_EPOCHS} must be >= 0.")
    sched: _EpochScheduler = selected(cfg, "SOLVER.SCHED").from_config(cfg, optimizer)
    if s.FREEZE_BACKBONE_EPOCHS:
        # Set after construction (the instance attribute), then put epoch 1's lr in place.
        sched.freeze_epochs = int(s.FREEZE_BACKBONE_EPOCHS)
        for group, lr in zip(optimizer.param_groups, sched.get_lr()):
            group["lr"] = lr
        sched._last_lr = [group["lr"] for group in optimizer.param_groups]
    return sched


LR_STEP_UNITS = ("epoch", "iter", "warmup")


class IterationLR:
    """Moves an epoch scheduler's lr inside the epoch (SOLVER.LR_STEP_UNIT 'iter' / 'warmup').

    The epoch schedulers are closed forms lr = base_lr * factor(t); this evaluates factor at the
    fractional epoch t = e + i / n before iteration i (0-based) of epoch e (0-based), so a
    warm-up over W epochs rises linearly over W * n iterations as fast-reid's WarmupLR does. In
    'warmup' mode only the warm-up epochs are fractional; the decay keeps the epoch's value
    (fast-reid steps its cosine/multistep per epoch). It derives everything from (e, i) and the
    scheduler's base_lrs, so a resumed run sets the same lr and nothing needs saving. The epoch
    scheduler keeps stepping after each epoch; at i = 0 both give the same lr.
    """

    def __init__(self, scheduler: _EpochScheduler, unit: str, iters_per_epoch: int) -> None:
        if unit not in ("iter", "warmup"):
            raise ConfigError(
                f"SOLVER.LR_STEP_UNIT = {unit!r}: IterationLR serves 'iter' or 'warmup'."
            )
        if iters_per_epoch < 1:
            raise ConfigError("the training loader yields no batch: nothing to schedule per iteration")
        self.scheduler = scheduler
        self.unit = unit
        self.iters_per_epoch = int(iters_per_epoch)

    def t_at(self, epoch: int, it: int) -> float:
        """The fractional epoch of iteration `it` (0-based) in epoch `epoch` (0-based)."""
        if self.unit == "warmup" and epoch >= getattr(self.scheduler, "warmup_iters", 0):
            return float(epoch)
        return epoch + it / self.iters_per_epoch

    def __call__(self, epoch: int, it: int) -> float:
        """Set every group's lr for this iteration; returns the first group's (for the log)."""
        factor = self.scheduler.factor(self.t_at(epoch, it))
        # SOLVER.FREEZE_BACKBONE_EPOCHS holds the backbone groups at 0, as the epoch scheduler.
        frozen = epoch < getattr(self.scheduler, "freeze_epochs", 0)
        for group, base in zip(self.scheduler.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = 0.0 if frozen and group.get("backbone") else base * factor
        return self.scheduler.optimizer.param_groups[0]["lr"]


def build_iteration_lr(cfg: CfgNode, scheduler: LRScheduler, iters_per_epoch: int) -> IterationLR | None:
    """None for SOLVER.LR_STEP_UNIT 'epoch' (the original: the trainer only steps per epoch)."""
    unit = cfg.SOLVER.LR_STEP_UNIT
    if unit not in LR_STEP_UNITS:
        raise ConfigError(
            f"SOLVER.LR_STEP_UNIT = {unit!r}: use one of {', '.join(map(repr, LR_STEP_UNITS))}."
        )
    if unit == "epoch":
        return None
    if not isinstance(scheduler, _EpochScheduler):
        raise ConfigError(
            f"SOLVER.LR_STEP_UNIT = {unit!r} needs a closed-form schedule (SOLVER.SCHED "
            f"'multistep' or 'cosine'); {type(scheduler).__name__} has none: use 'epoch'."
        )
    return IterationLR(scheduler, unit, iters_per_epoch)


@config_check("schedule")
def check_schedule_keys(cfg: CfgNode) -> None:
    """The epoch count, warm-up, milestones, lr step unit and weight averaging (SOLVER.WA*)."""
    s = cfg.SOLVER
    check_choices(cfg, {
        "SOLVER.WARMUP_METHOD": ("linear", "constant"),
        "SOLVER.LR_STEP_UNIT": LR_STEP_UNITS,
        "SOLVER.WA": ("off", "ema", "swa"),
    })
    for key in ("MAX_EPOCHS", "LR_REFERENCE_BATCH"):
        if s[key] < 1:
            raise ConfigError(f"SOLVER.{key} = {s[key]} must be at least 1.")
    if s.WARMUP_ITERS < 0:
        raise ConfigError(f"SOLVER.WARMUP_ITERS = {s.WARMUP_ITERS} must be >= 0 (epochs).")
    steps = list(s.STEPS)
    if steps != sorted(steps):
        raise ConfigError(f"SOLVER.STEPS = {steps} must be increasing epoch numbers.")
    for key in ("FREEZE_BACKBONE_EPOCHS", "COSINE_DELAY_EPOCHS"):
        if s[key] < 0:
            raise ConfigError(f"SOLVER.{key} = {s[key]} must be >= 0 (epochs).")
    if not 0.0 <= s.WA_START < 1.0:
        raise ConfigError(f"SOLVER.WA_START = {s.WA_START} must lie in [0, 1) (a fraction of MAX_EPOCHS).")
    if not 0.0 < s.WA_EMA_DECAY < 1.0:
        raise ConfigError(f"SOLVER.WA_EMA_DECAY = {s.WA_EMA_DECAY} must lie in (0, 1) (layumi: 0.996).")
