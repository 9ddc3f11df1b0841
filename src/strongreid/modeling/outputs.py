"""What every model's training forward returns, so that the losses and the trainer treat all heads alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

Logits = torch.Tensor | list[torch.Tensor]


def is_part_logits(logits: object) -> bool:
    """True for a part model's logits (PCB): a list (or tuple) of one tensor per part."""
    return isinstance(logits, (list, tuple))


def class_scores(logits: Logits) -> torch.Tensor:
    """Scores whose argmax is the prediction: a part model sums its parts' softmaxes (as layumi's PCB)."""
    if is_part_logits(logits):
        return torch.stack([F.softmax(t, dim=1) for t in logits]).sum(0)
    return logits


class ModelOutput(NamedTuple):
    """A training forward's result.

    `logits`: the classifier output the ID loss sees, one tensor, or a list with one tensor per
    part (PCB, whose ID loss is the sum over parts). `features`: the feature the metric losses
    (triplet, center, ...) see: one tensor, or a list whose metric losses are summed (CLIP-ReID
    mines triplets on three features of different widths). A NamedTuple, so `logits, features = model(x)` still unpacks
    and DDP / torch.compile pass it through.
    """

    logits: Logits
    features: torch.Tensor | list[torch.Tensor]

    @property
    def parts(self) -> list[torch.Tensor]:
        """The logits as a list: one entry per part, or the single tensor alone."""
        return list(self.logits) if is_part_logits(self.logits) else [self.logits]

    def float(self) -> ModelOutput:
        """An fp32 copy (the losses run in fp32: triplet distances and center terms lose too much in bf16)."""
        logits = [t.float() for t in self.logits] if is_part_logits(self.logits) else self.logits.float()
        return ModelOutput(logits, self.map_features(lambda f: f.float()))

    def map_features(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """fn applied to the feature, or to each of a list of features."""
        if isinstance(self.features, (list, tuple)):
            return [fn(f) for f in self.features]
        return fn(self.features)

    def sum_over_features(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """fn(feature), summed over a list of features."""
        if isinstance(self.features, (list, tuple)):
            return torch.stack([fn(f) for f in self.features]).sum()
        return fn(self.features)

    def class_scores(self) -> torch.Tensor:
        """Scores whose argmax is the predicted class (what accuracy is measured on)."""
        return class_scores(self.logits)

    def sum_over_parts(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """fn(logits), summed over the parts of a part model."""
        if is_part_logits(self.logits):
            return torch.stack([fn(part) for part in self.logits]).sum()
        return fn(self.logits)
