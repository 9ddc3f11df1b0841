"""Optimisers (the original's per-parameter rules), the center SGD, and epoch LR schedules."""

from strongreid.solver.lr_scheduler import WarmupCosineLR, WarmupMultiStepLR, build_scheduler
from strongreid.solver.optimizer import (
    make_center_optimizer,
    make_optimizer,
    optimizer_names,
    param_groups,
    step_center,
)

__all__ = [
    "WarmupCosineLR",
    "WarmupMultiStepLR",
    "build_scheduler",
    "make_center_optimizer",
    "make_optimizer",
    "optimizer_names",
    "param_groups",
    "step_center",
]
