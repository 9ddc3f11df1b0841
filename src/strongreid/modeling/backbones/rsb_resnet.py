"""reid-strong-baseline's own ResNet, stem ReLU missing, for the checkpoints it trained.

The original's resnet.py comments out the ReLU after the stem BN ("add missed relu", issues #4,
#117); strongreid's `resnet*` keep it (the ImageNet weights were trained with it). A model trained
by the original computes its features without it, so its released / converted files load into
`rsb_resnet{18,34,50,101,152}`: the same parameters (`conv1`, `bn1`, `layer1`...) and this forward.
The `reid-strong-baseline` checkpoint format picks it; train with `resnet*`.
"""

from __future__ import annotations

import torch

from strongreid.modeling.backbones.resnet import ResNetBackbone, register_resnets


class RSBResNet(ResNetBackbone):
    """torchvision ResNet without the stem ReLU (conv1 -> bn1 -> maxpool), as the original."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


register_resnets(RSBResNet, "rsb_resnet")
