"""fast-reid model-zoo files (BoT / AGW / SBS with ResNet-50/101, optionally IBN-a).

fast-reid's Checkpointer writes `{"model": state_dict, "optimizer", "scheduler", "iteration"}`;
the Baseline meta-architecture's keys are `backbone.*` (its ResNet: `backbone.layer1.0.bn1.IN`,
`backbone.NL_2.0.g` ...), `heads.*` (EmbeddingHead: `heads.pool_layer.p` for learned GeM,
`heads.bottleneck.0.*` the BNNeck, `heads.weight` or, before v1.2, `heads.classifier.weight`),
and, in files written before v1.2 (the v0.1.1 model zoo), `pixel_mean` / `pixel_std` buffers in
0-255 units: fast-reid feeds 0-255 images and normalises inside the model. Its test feature is
the BNNeck output whatever HEADS.NECK_FEAT says (that key only picks the triplet-loss feature).

What the keys say, and what it becomes here:

    backbone.layer1.0.bn1.IN.*     IBN-a in layer1-3          -> fastreid_resnet{50,101}_ibn*
    backbone.NL_*                  non-local blocks           -> fastreid_resnet*_nl
    heads.pool_layer.p             learned GeM (SBS)          -> MODEL.POOLING gem, GEM_P = p
    no p, non-local blocks         GeM p = 3 (AGW)            -> MODEL.POOLING gem, GEM_P 3
    no p, no non-local             average pooling (BoT)      -> MODEL.POOLING avg
    pixel_mean / pixel_std         0-255                      -> INPUT.PIXEL_MEAN / STD / 255
    (absent)                       fast-reid's defaults       -> ImageNet mean / std

LAST_STRIDE is 1 (every fast-reid ReID config). The files do not record the input size: it is
the recipe's, 384x128 for SBS and 256x128 for BoT and AGW. The test transform is fast-reid's
(data/transforms/build.py): bicubic resize (`interpolation=3`), no crop, no flip.
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

NECK = "heads.bottleneck.0."
CLASSIFIER_KEYS = ("heads.weight", "heads.classifier.weight")


def _state(raw: Mapping[str, Any]):
    return tensors_of(raw, ("model", "state_dict"))


@CHECKPOINT_FORMATS.register("fastreid")
class FastReIDFormat:
    description = "fast-reid Baseline files (BoT / AGW / SBS model zoo, model_final.pth)"

    def detect(self, raw: Mapping[str, Any]) -> bool:
        state, _ = _state(raw)
        return (any(k.startswith("heads.") for k in state)
                and any(k.startswith("backbone.") for k in state))

    def convert(self, raw: Mapping[str, Any], path: Path) -> Converted:
        state, outer = _state(raw)
        keys = set(state)
        if not self.detect(raw):
            raise CheckpointError(
                f"{path} is not a fast-reid Baseline checkpoint: it has no backbone.* and heads.* "
                "tensors (MODEL.CHECKPOINT_FORMAT is 'fastreid'; set 'auto' to detect the format)"
            )
        depth = resnet_depth(keys, "backbone.")
        ibn = "backbone.layer1.0.bn1.IN.weight" in keys
        nl = any(k.startswith("backbone.NL_") for k in keys)
        learned_p = "heads.pool_layer.p" in keys
        recipe = ("SBS" if learned_p else "AGW") if nl else "BoT"
        if depth not in (50, 101):
            kind = ("ResNeSt" if any(".radix" in k or "conv2.fc1" in k for k in keys)
                    else f"ResNet-{depth}" if depth else "an unknown backbone")
            raise CheckpointError(
                f"{path} is a fast-reid checkpoint with {kind}; strongreid reads fast-reid's "
                "ResNet-50 / ResNet-101 (plain or IBN-a, with or without non-local) models"
            )
        arch = f"{recipe}(R{depth}{'-ibn' if ibn else ''})"
        classifier = next((k for k in CLASSIFIER_KEYS if k in keys), None)
        if NECK + "weight" not in keys or classifier is None:
            raise CheckpointError(
                f"{path} is a fast-reid {arch} checkpoint without a BNNeck ({NECK}*) or classifier "
                f"({' / '.join(CLASSIFIER_KEYS)}); strongreid reads EmbeddingHead models with "
                "WITH_BNNECK True and EMBEDDING_DIM 0"
            )
        if state[NECK + "weight"].ndim != 1:
            raise CheckpointError(
                f"{path} is a fast-reid {arch} checkpoint whose head reduces the feature with a "
                "1x1 conv (EMBEDDING_DIM > 0), which strongreid's BNNeck head does not have"
            )
        out: dict = {}
        unused = []
        for key, tensor in state.items():
            if key.startswith("backbone."):
                out[key] = tensor
            elif key.startswith(NECK):
                out["bottleneck." + key[len(NECK):]] = tensor
            elif key == classifier:
                out["classifier.weight"] = tensor
            elif key not in ("pixel_mean", "pixel_std", "heads.pool_layer.p"):
                unused.append(key)
        if unused:
            raise unused_error(path, "fast-reid", arch, unused)
        overrides: dict[str, Any] = {
            "MODEL.NAME": f"fastreid_resnet{depth}" + ("_ibn" if ibn else "") + ("_nl" if nl else ""),
            "MODEL.LAST_STRIDE": 1, "MODEL.HEAD": "baseline", "MODEL.NECK": "bnneck",
            "TEST.NECK_FEAT": "after", "MODEL.POOLING": "gem" if nl else "avg",
            "INPUT.SIZE_TEST": [384, 128] if recipe == "SBS" else [256, 128],
            "INPUT.INTERPOLATION": "bicubic", **imagenet_pixels(),
        }
        if learned_p:
            overrides["MODEL.GEM_P"] = float(state["heads.pool_layer.p"].reshape(-1)[0])
        elif nl:
            overrides["MODEL.GEM_P"] = 3.0  # GeneralizedMeanPooling's fixed norm
        for buffer, key in (("pixel_mean", "INPUT.PIXEL_MEAN"), ("pixel_std", "INPUT.PIXEL_STD")):
            if buffer in state:
                values = state[buffer].reshape(-1).double() / 255.0
                if values.numel() != 3:
                    raise CheckpointError(f"{path}: {buffer} has {values.numel()} values, not 3 (RGB)")
                overrides[key] = [float(v) for v in values]
        return Converted(state=out, overrides=overrides,
                         num_classes=int(state[classifier].shape[0]),
                         source=f"fast-reid {arch}",
                         ignored=training_state(outer))
