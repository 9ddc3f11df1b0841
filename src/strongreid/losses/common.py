"""Numerics shared by the loss terms."""

from __future__ import annotations

import torch


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs (autocast outputs) are promoted: distances, exp and log lose too
    much in bf16/fp16. fp32 and fp64 stay as they are."""
    if t.is_floating_point() and t.element_size() < 4:
        return t.float()
    return t
