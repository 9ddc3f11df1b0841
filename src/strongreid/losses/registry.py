"""The loss registry: name -> nn.Module class, so users can add their own terms."""

from __future__ import annotations

from strongreid.registry import Registry

LOSSES: Registry = Registry("loss")
