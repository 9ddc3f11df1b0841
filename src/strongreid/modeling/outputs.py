"""What every model's training forward returns, so that the losses and the trainer treat all heads alike."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

Logits = torch.Tensor | list[torch.Tensor]


class Branches(list):
    """Tensors of a multi-branch model, one per branch, and the weight of each branch's loss.

    CLIP-ReID classifies its image and projected features and mines triplets on three
    features of different widths, summing the losses: `Branches(tensors, [1.0] * n)`. As logits,
    the first branch's scores are the prediction; as features, every metric term is the weighted
    sum of the term on each branch (`ModelOutput.over_features`).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
        super().__init__(tensors)
        if len(weights) != len(self):
            raise ValueError(f"{len(self)} branches need {len(self)} weights, got {len(weights)}")
        self.weights = tuple(float(w) for w in weights)

    def weighted_sum(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """sum_i weight_i * fn(branch_i)."""
        return torch.stack([w * fn(t) for w, t in zip(self.weights, self)]).sum()

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Branches:
        """fn on every branch, same weights."""
        return Branches([fn(t) for t in self], self.weights)


def is_part_logits(logits: object) -> bool:
    """True for a part model's logits (PCB): a list (or tuple) of one tensor per part."""
    return isinstance(logits, (list, tuple))


def class_scores(logits: Logits) -> torch.Tensor:
    """Scores whose argmax is the prediction: a part model sums its parts' softmaxes (as layumi's PCB)."""
    if isinstance(logits, Branches):
        return logits[0]
    if is_part_logits(logits):
        return torch.stack([F.softmax(t, dim=1) for t in logits]).sum(0)
    return logits


class ModelOutput(NamedTuple):
    """A training forward's result.

    `logits`: the classifier output the ID loss sees, one tensor, or a list with one tensor per
    part (PCB, whose ID loss is the sum over parts). `features`: the feature the metric losses
    (triplet, center, ...) see. A NamedTuple, so `logits, features = model(x)` still unpacks
    and DDP / torch.compile pass it through.
    """

    logits: Logits
    features: torch.Tensor | Branches

    @property
    def parts(self) -> list[torch.Tensor]:
        """The logits as a list: one entry per part, or the single tensor alone."""
        return list(self.logits) if is_part_logits(self.logits) else [self.logits]

    def float(self) -> ModelOutput:
        """An fp32 copy (the losses run in fp32: triplet distances and center terms lose too much in bf16)."""
        if isinstance(self.logits, Branches):
            logits: Logits = self.logits.map(torch.Tensor.float)
        else:
            logits = [t.float() for t in self.logits] if is_part_logits(self.logits) else self.logits.float()
        feats = self.features
        return ModelOutput(logits, feats.map(torch.Tensor.float) if isinstance(feats, Branches) else feats.float())

    def class_scores(self) -> torch.Tensor:
        """Scores whose argmax is the predicted class (what accuracy is measured on)."""
        return class_scores(self.logits)

    def sum_over_parts(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """fn(logits), summed over the parts of a part model (weighted over Branches)."""
        if isinstance(self.logits, Branches):
            return self.logits.weighted_sum(fn)
        if is_part_logits(self.logits):
            return torch.stack([fn(part) for part in self.logits]).sum()
        return fn(self.logits)

    def over_features(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """fn(features), or its weighted sum over the branches of a multi-branch model."""
        if isinstance(self.features, Branches):
            return self.features.weighted_sum(fn)
        return fn(self.features)
