"""Optimisers (the original's per-parameter rules), the center SGD, and epoch LR schedules."""

from strongreid.solver.lr_scheduler import (
    IterationLR,
    WarmupCosineLR,
    WarmupMultiStepLR,
    build_iteration_lr,
    build_scheduler,
)
from strongreid.solver.optimizer import (
    make_center_optimizer,
    make_optimizer,
    optimizer_names,
    param_groups,
    step_center,
)

__all__ = [
    "IterationLR",
    "build_iteration_lr",
    "WarmupCosineLR",
    "WarmupMultiStepLR",
    "build_scheduler",
    "make_center_optimizer",
    "make_optimizer",
    "optimizer_names",
    "param_groups",
    "step_center",
]
