"""Optimisers with the original's per-parameter rules, and the center-loss SGD."""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from yacs.config import CfgNode

from strongreid.config.components import check_choices, config_check
from strongreid.errors import ConfigError

# What a config may name in SOLVER.OPTIMIZER_NAME (make_optimizer itself takes any torch.optim class).
OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam", "Adadelta")


def optimizer_names() -> list[str]:
    """Every optimiser class torch.optim offers (what SOLVER.OPTIMIZER_NAME may name)."""
    return sorted(
        name for name, obj in vars(torch.optim).items()
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)
        and obj is not torch.optim.Optimizer
    )


def param_groups(
    model: nn.Module, base_lr: float, weight_decay: float, bias_lr_factor: float,
    weight_decay_bias: float, backbone_lr_factor: float = 1.0, split_backbone: bool = False,
) -> list[dict]:
    """The original's per-parameter rules, one group per distinct (lr, weight decay) instead of one per tensor.

    A parameter whose name contains "bias" gets lr * BIAS_LR_FACTOR and WEIGHT_DECAY_BIAS, every
    other one BASE_LR and WEIGHT_DECAY; frozen parameters (the BNNeck shift) are left out.
    Backbone parameters (`backbone.*`) also get lr * SOLVER.BACKBONE_LR_FACTOR (layumi: 0.1) and
    groups of their own flagged `backbone` (what SOLVER.FREEZE_BACKBONE_EPOCHS holds at lr 0),
    when the factor is not 1 or `split_backbone`; otherwise the groups are the original's.
    """
    split_backbone = split_backbone or backbone_lr_factor != 1.0
    # A model whose pretrained stages live beside `backbone` too (MGN's branches) names them.
    prefixes = tuple(getattr(model, "backbone_prefixes", ("backbone.",)))
    groups: dict[tuple[float, float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_backbone = split_backbone and name.startswith(prefixes)
        factor = backbone_lr_factor if in_backbone else 1.0
        if "bias" in name:
            key, label = (base_lr * bias_lr_factor * factor, weight_decay_bias, in_backbone), "bias"
        else:
            key, label = (base_lr * factor, weight_decay, in_backbone), "weight"
        group = groups.setdefault(
            key, {"params": [], "lr": key[0], "weight_decay": key[1], "backbone": in_backbone,
                  "name": ("backbone " if in_backbone else "") + label}
        )
        group["params"].append(p)
    if not groups:
        raise ConfigError("the model has no trainable parameter to optimise")
    return list(groups.values())


def make_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """torch.optim.<SOLVER.OPTIMIZER_NAME> over the original's parameter groups; SGD also gets SOLVER.MOMENTUM."""
    s = cfg.SOLVER
    name = s.OPTIMIZER_NAME
    valid = optimizer_names()
    if name not in valid:
        raise ConfigError(
            f"SOLVER.OPTIMIZER_NAME = {name!r} is not a torch.optim optimiser; valid names: "
            f"{', '.join(valid)}."
        )
    groups = param_groups(model, s.BASE_LR, s.WEIGHT_DECAY, s.BIAS_LR_FACTOR, s.WEIGHT_DECAY_BIAS,
                          s.BACKBONE_LR_FACTOR, split_backbone=s.FREEZE_BACKBONE_EPOCHS > 0)
    cls = getattr(torch.optim, name)
    if s.NESTEROV and name != "SGD":
        raise ConfigError(f"SOLVER.NESTEROV applies to SGD only; SOLVER.OPTIMIZER_NAME is {name!r}.")
    kwargs = {"momentum": s.MOMENTUM, "nesterov": bool(s.NESTEROV)} if name == "SGD" else {}
    return cls(groups, lr=s.BASE_LR, **kwargs)


def make_center_optimizer(cfg: CfgNode, center_loss: nn.Module) -> torch.optim.SGD:
    """Plain SGD on the centers at SOLVER.CENTER_LR; no momentum or decay, never scheduled."""
    return torch.optim.SGD(center_loss.parameters(), lr=cfg.SOLVER.CENTER_LR)


def step_center(
    center_optimizer: torch.optim.Optimizer,
    center_loss: nn.Module,
    weight: float,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Undo the loss weight on the center gradients, then step the center optimiser.

    The total loss carries weight * L_center so that the network sees a weighted term; the
    centers should move by the unweighted gradient (the original's 1/weight rescale).
    With lr = CENTER_LR this gives c_j <- c_j + (2 lr / B) sum_{i: y_i = j} (x_i - c_j).
    Call it after backward (gradients are not zeroed here). With a GradScaler in use, pass it and
    call this before `scaler.update()`: the gradients are unscaled first and the step is skipped
    on inf/NaN like the model's.
    """
    if weight <= 0:
        raise ConfigError(f"SOLVER.CENTER_LOSS_WEIGHT = {weight} must be positive with center loss.")
    if scaler is not None and scaler.is_enabled():
        scaler.unscale_(center_optimizer)
    for p in center_loss.parameters():
        if p.grad is not None:
            p.grad.mul_(1.0 / weight)
    if scaler is not None and scaler.is_enabled():
        scaler.step(center_optimizer)
    else:
        center_optimizer.step()


@config_check("optimizer")
def check_optimizer_keys(cfg: CfgNode) -> None:
    """SOLVER.OPTIMIZER_NAME, BASE_LR, NESTEROV, BACKBONE_LR_FACTOR."""
    s = cfg.SOLVER
    check_choices(cfg, {"SOLVER.OPTIMIZER_NAME": OPTIMIZERS})
    if s.BASE_LR <= 0:
        raise ConfigError(f"SOLVER.BASE_LR = {s.BASE_LR} must be positive.")
    if s.BACKBONE_LR_FACTOR < 0:
        raise ConfigError(f"SOLVER.BACKBONE_LR_FACTOR = {s.BACKBONE_LR_FACTOR} must be >= 0 (layumi: 0.1).")
    if s.NESTEROV and s.OPTIMIZER_NAME != "SGD":
        raise ConfigError(
            f"SOLVER.NESTEROV applies to SGD only; SOLVER.OPTIMIZER_NAME is {s.OPTIMIZER_NAME!r}."
        )
