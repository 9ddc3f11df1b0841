"""Validation loss and top-1 error on held-out images of the training identities (layumi's val)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strongreid.engine.inference import camera_inputs
from strongreid.engine.runtime import autocast


@torch.no_grad()
def validation_metrics(
    model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None
) -> dict[str, float]:
    """{"val_loss": mean cross-entropy, "val_error": 1 - top-1 accuracy, "val_images": n}.

    The model runs in eval mode (BatchNorm running statistics, no dropout), as layumi's val
    phase does, but its classifier output is needed: the top module alone is switched to
    training so that its forward returns its ModelOutput while every layer below stays in
    eval mode. The loss is plain cross-entropy (no label smoothing), layumi's criterion.
    """
    model = getattr(model, "module", model)  # DDP: the bare module, no collectives
    was_training = model.training
    model.eval()
    model.training = True
    loss_sum = 0.0
    wrong = 0
    count = 0
    try:
        for images, pids, camids, _paths in loader:
            images = images.to(device, non_blocking=True)
            targets = pids.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                outputs = model(images, **camera_inputs(model, camids, device))
            outputs = outputs.float()
            # A part model's (PCB) losses add up over its parts, as in training.
            loss_sum += sum(float(F.cross_entropy(t, targets, reduction="sum")) for t in outputs.parts)
            scores = outputs.class_scores()
            wrong += int((scores.argmax(1) != targets).sum())
            count += int(targets.numel())
    finally:
        model.train(was_training)
    if count == 0:
        return {"val_loss": float("nan"), "val_error": float("nan"), "val_images": 0}
    return {"val_loss": loss_sum / count, "val_error": wrong / count, "val_images": count}
