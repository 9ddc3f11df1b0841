"""reid-strong-baseline (Luo et al.) state dicts of its plain-ResNet Baseline models.

Its `Baseline` names the backbone `base` (`base.conv1.weight`, `base.layer1...`), then
`bottleneck` (BNNeck, absent with MODEL.NECK 'no') and `classifier`. The released
`resnet50_model_*.pth` and the files ignite 0.1.2 wrote during training hold the whole pickled
module instead, which no safe loader can open: `strongreid.modeling.loading` says so, and
docs/model-zoo.md shows the one-line conversion with the original code, which gives the state
dict this format reads.

Only the plain ResNets need a format of their own: the original's ResNet has no stem ReLU, so
they load into `rsb_resnet*` (modeling/backbones/rsb_resnet.py). Its SENet and IBN-a files have
the same forward as strongreid's `se_*` / `resnet50_ibn_a` and load as strongreid files (native).
MODEL.LAST_STRIDE stays the config's (1 in every original config), as does TEST.NECK_FEAT.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from strongreid.errors import CheckpointError
from strongreid.modeling.formats import CHECKPOINT_FORMATS, Converted
from strongreid.modeling.formats._peers import (
    imagenet_pixels,
    resnet_depth,
    tensors_of,
    training_state,
    unused_error,
)


def _state(raw: Mapping[str, Any]):
    return tensors_of(raw, ("state_dict",))


@CHECKPOINT_FORMATS.register("reid-strong-baseline")
class RSBFormat:
    description = "reid-strong-baseline Baseline state dicts (base.* / bottleneck.* / classifier.*), plain ResNet"

    def detect(self, raw: Mapping[str, Any]) -> bool:
        state, _ = _state(raw)
        keys = set(state)
        # Plain ResNet only: IBN-a has `bn1.IN`, SENet `layer0`; strongreid files say `backbone.`.
        return ("base.conv1.weight" in keys and "base.layer1.0.conv1.weight" in keys
                and "classifier.weight" in keys and "base.layer1.0.bn1.IN.weight" not in keys
                and not any(k.startswith("backbone.") for k in keys))

    def convert(self, raw: Mapping[str, Any], path: Path) -> Converted:
        state, outer = _state(raw)
        keys = set(state)
        depth = resnet_depth(keys, "base.")
        if not self.detect(raw) or depth is None:
            raise CheckpointError(
                f"{path} is not a reid-strong-baseline plain-ResNet Baseline state dict (base.conv1, "
                "base.layer1..., classifier; ResNet-18/34/50/101/152). Its SENet / IBN-a files "
                "load with MODEL.CHECKPOINT_FORMAT strongreid and the matching MODEL.NAME."
            )
        neck = "bnneck" if "bottleneck.weight" in keys else "no"
        arch = f"ResNet-{depth} Baseline (neck {neck})"
        out: dict = {}
        unused = []
        for key, tensor in state.items():
            if key.startswith("base."):
                out["backbone." + key[len("base."):]] = tensor
            elif key.startswith(("bottleneck.", "classifier.")):
                out[key] = tensor
            else:
                unused.append(key)
        if unused:
            raise unused_error(path, "reid-strong-baseline", arch, unused)
        # Its test transform: T.Resize(SIZE_TEST) with torchvision's default filter, bilinear.
        overrides = {"MODEL.NAME": f"rsb_resnet{depth}", "MODEL.NECK": neck, "MODEL.HEAD": "baseline",
                     "MODEL.POOLING": "avg", "INPUT.SIZE_TEST": [256, 128],
                     "INPUT.INTERPOLATION": "bilinear", **imagenet_pixels()}
        return Converted(state=out, overrides=overrides,
                         num_classes=int(state["classifier.weight"].shape[0]),
                         source=f"reid-strong-baseline {arch}",
                         ignored=training_state(outer))
