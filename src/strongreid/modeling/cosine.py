"""The cosine classifier that margin ID losses (ArcFace, CosFace, SphereFace, circle softmax) need."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CosineClassifier(nn.Module):
    """x -> cos(theta) between the L2-normalised feature and each L2-normalised class weight.

    The weight is named and shaped as the bias-free Linear's (`weight`, classes x features), so
    checkpoints keep their keys and `load_test_weights` treats both alike. Computed in fp32 even
    under autocast: the margin is added to cosines, which bf16 rounds to about 0.004.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        # fast-reid's initialisation for its cosine heads; the scale only sets the step size.
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            if x.element_size() < 4:  # bf16/fp16 autocast output; fp64 stays fp64
                x = x.float()
            w = self.weight.to(x.dtype)
            return F.linear(F.normalize(x, dim=1), F.normalize(w, dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def use_cosine_classifier(model: nn.Module) -> None:
    """Swap every class-count Linear of the model for a CosineClassifier of the same size.

    Those are the modules under the model's `class_layers` prefixes (layumi's ClassBlock
    `classifier.classifier.0`, PCB's one per part), or ReIDModel's `classifier`.
    """
    prefixes = tuple(getattr(model, "class_layers", ("classifier.",)))
    targets = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and (name + ".").startswith(prefixes)]
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, leaf)
        setattr(parent, leaf, CosineClassifier(old.in_features, old.out_features))
