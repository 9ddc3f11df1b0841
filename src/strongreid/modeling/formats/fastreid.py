"""fast-reid model-zoo files: BoT / AGW / SBS (ResNet-50/101, optionally IBN-a, or ResNeSt) and MGN.

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
    backbone.conv1.0.*, conv2.fc1  ResNeSt (deep stem, split attention)
                                                              -> fastreid_resnest{50,101,200,269}
    heads.pool_layer.p             learned GeM (SBS)          -> MODEL.POOLING gem, GEM_P = p
    no p, non-local blocks         GeM p = 3 (AGW)            -> MODEL.POOLING gem, GEM_P 3
    no p, no non-local             average pooling (BoT)      -> MODEL.POOLING avg
    pixel_mean / pixel_std         0-255                      -> INPUT.PIXEL_MEAN / STD / 255
    (absent)                       fast-reid's defaults       -> ImageNet mean / std

fast-reid's ResNeSt builder ignores WITH_NL, so its AGW(S50) file holds the same tensors as
BoT(S50) and differs only by fixed GeM p = 3: average pooling is the guess, with a warning.

MGN (meta_arch/mgn.py) keeps the ResNet cut into `backbone.0`..`backbone.6` (stem, layer1,
layer2, layer3[0]) and three branches `b1`, `b2`, `b3` (layer3[1:] and layer4 each) with eight
EmbeddingHeads `b1_head` .. `b33_head` (`pool_layer.p`, `bottleneck.0` the 1x1 conv to
EMBEDDING_DIM, `bottleneck.1` the BN, `weight` the classifier). It becomes MODEL.HEAD 'mgn'
(modeling/heads/mgn.py) on fastreid_resnet{50,101}[_ibn], with MGN_EMBEDDING_DIM read off the
conv. fast-reid's v0.x MGN (`b1_pool.*` with a ReLU after the reduction) is another network and
is refused.

LAST_STRIDE is 1 (every fast-reid ReID config). The files do not record the input size: it is
the recipe's, 384x128 for SBS and MGN and 256x128 for BoT and AGW. The test transform is
fast-reid's (data/transforms/build.py): bicubic resize (`interpolation=3`), no crop, no flip.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from strongreid.errors import CheckpointError
from strongreid.modeling.formats import CHECKPOINT_FORMATS, Converted
from strongreid.modeling.formats._peers import (
    block_count,
    imagenet_pixels,
    resnet_depth,
    tensors_of,
    training_state,
    unused_error,
)

NECK = "heads.bottleneck.0."
CLASSIFIER_KEYS = ("heads.weight", "heads.classifier.weight")
# (layer2, layer3) block counts -> depth, fast-reid's build_resnest_backbone table.
RESNEST_DEPTHS = {(4, 6): 50, (4, 23): 101, (24, 36): 200, (30, 48): 269}
MGN_HEADS = ("b1_head", "b2_head", "b21_head", "b22_head", "b3_head", "b31_head", "b32_head", "b33_head")
PIXEL_BUFFERS = ("pixel_mean", "pixel_std")
TEST_TRANSFORM = {"INPUT.INTERPOLATION": "bicubic"}


def _state(raw: Mapping[str, Any]):
    return tensors_of(raw, ("model", "state_dict"))


def _is_mgn(keys: set[str]) -> bool:
    # fast-reid's heads hold the classifier as `weight` (strongreid's MGN: `classifier.weight`);
    # v0.x files have `b1_pool.*`.
    return (("b1_head.weight" in keys or any(k.startswith("b1_pool.") for k in keys))
            and any(k.startswith("backbone.") for k in keys))


def _pixels(state: Mapping[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """INPUT.PIXEL_MEAN / STD: the file's 0-255 buffers / 255 where it has them, else ImageNet."""
    out: dict[str, Any] = imagenet_pixels()
    for buffer, key in zip(PIXEL_BUFFERS, ("INPUT.PIXEL_MEAN", "INPUT.PIXEL_STD")):
        if buffer in state:
            values = state[buffer].reshape(-1).double() / 255.0
            if values.numel() != 3:
                raise CheckpointError(f"{path}: {buffer} has {values.numel()} values, not 3 (RGB)")
            out[key] = [float(v) for v in values]
    return out


@CHECKPOINT_FORMATS.register("fastreid")
class FastReIDFormat:
    description = "fast-reid Baseline and MGN files (BoT / AGW / SBS / MGN model zoo, model_final.pth)"

    def detect(self, raw: Mapping[str, Any]) -> bool:
        state, _ = _state(raw)
        return ((any(k.startswith("heads.") for k in state)
                 and any(k.startswith("backbone.") for k in state)) or _is_mgn(set(state)))

    def convert(self, raw: Mapping[str, Any], path: Path) -> Converted:
        state, outer = _state(raw)
        keys = set(state)
        if not self.detect(raw):
            raise CheckpointError(
                f"{path} is not a fast-reid Baseline checkpoint (nor an MGN one): it has no "
                "backbone.* with heads.* (or b1_head.*) tensors (MODEL.CHECKPOINT_FORMAT is "
                "'fastreid'; set 'auto' to detect the format)"
            )
        if _is_mgn(keys):
            return self._convert_mgn(state, outer, path)
        resnest = "backbone.conv1.0.weight" in keys and any(".conv2.fc1." in k for k in keys)
        ibn = "backbone.layer1.0.bn1.IN.weight" in keys
        nl = any(k.startswith("backbone.NL_") for k in keys)
        learned_p = "heads.pool_layer.p" in keys
        recipe = ("SBS" if learned_p else "AGW") if nl else ("SBS" if learned_p else "BoT")
        if resnest:
            counts = (block_count(keys, "backbone.layer2"), block_count(keys, "backbone.layer3"))
            depth = RESNEST_DEPTHS.get(counts)
            if depth is None:
                raise CheckpointError(
                    f"{path} is a fast-reid checkpoint with a ResNeSt of {counts[0]} / {counts[1]} "
                    "blocks in layer2 / layer3, which is none of fast-reid's S50 / S101 / S200 / S269"
                )
            name, arch = f"fastreid_resnest{depth}", f"{recipe}(S{depth})"
        else:
            depth = resnet_depth(keys, "backbone.")
            if depth not in (50, 101):
                kind = f"ResNet-{depth}" if depth else "an unknown backbone"
                raise CheckpointError(
                    f"{path} is a fast-reid checkpoint with {kind}; strongreid reads fast-reid's "
                    "ResNet-50 / ResNet-101 (plain or IBN-a, with or without non-local) and "
                    "ResNeSt models"
                )
            name = f"fastreid_resnet{depth}" + ("_ibn" if ibn else "") + ("_nl" if nl else "")
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
            elif key not in (*PIXEL_BUFFERS, "heads.pool_layer.p"):
                unused.append(key)
        if unused:
            raise unused_error(path, "fast-reid", arch, unused)
        overrides: dict[str, Any] = {
            "MODEL.NAME": name, "MODEL.LAST_STRIDE": 1, "MODEL.HEAD": "baseline",
            "MODEL.NECK": "bnneck", "TEST.NECK_FEAT": "after",
            "INPUT.SIZE_TEST": [384, 128] if recipe == "SBS" else [256, 128],
            **TEST_TRANSFORM, **_pixels(state, path),
        }
        defaults: dict[str, Any] = {}
        warnings: dict[str, str] = {}
        if learned_p:
            overrides["MODEL.POOLING"] = "gem"
            overrides["MODEL.GEM_P"] = float(state["heads.pool_layer.p"].reshape(-1)[0])
        elif nl:
            overrides["MODEL.POOLING"] = "gem"
            overrides["MODEL.GEM_P"] = 3.0  # GeneralizedMeanPooling's fixed norm
        elif resnest:
            defaults["MODEL.POOLING"] = "avg"
            warnings["MODEL.POOLING"] = (
                f"{path}: a fast-reid ResNeSt file without a learned GeM p is BoT(S{depth}) "
                f"(average pooling, used) or AGW(S{depth}) (GeM p = 3, same tensors); for an AGW "
                "file set MODEL.POOLING gem (GEM_P 3), or its features are those of another pooling"
            )
        else:
            overrides["MODEL.POOLING"] = "avg"
        return Converted(state=out, overrides=overrides,
                         num_classes=int(state[classifier].shape[0]),
                         source=f"fast-reid {arch}", ignored=training_state(outer),
                         defaults=defaults, warnings=warnings)

    def _convert_mgn(self, state: dict[str, torch.Tensor], outer: list[str], path: Path) -> Converted:
        keys = set(state)
        if any(k.startswith("b1_pool.") for k in keys):
            raise CheckpointError(
                f"{path} is a fast-reid v0.x MGN checkpoint (b1_pool.*: pooling, 1x1 conv, BN and "
                "ReLU before a separate head), a network strongreid does not build; strongreid reads "
                "the MGN of fast-reid v1 (b1_head.pool_layer / bottleneck / weight)"
            )
        counts = (block_count(keys, "backbone.5"), 1 + block_count(keys, "b1.0"))
        depth = {(4, 6): 50, (4, 23): 101}.get(counts)
        if depth is None or "backbone.4.0.conv3.weight" not in keys:
            raise CheckpointError(
                f"{path} is a fast-reid MGN checkpoint whose backbone is not a ResNet-50 / 101 "
                f"({counts[0]} / {counts[1]} blocks in layer2 / layer3); fast-reid's MGN is "
                "built on its ResNet only"
            )
        ibn = "backbone.4.0.bn1.IN.weight" in keys
        arch = f"MGN(R{depth}{'-ibn' if ibn else ''})"
        if any(".se." in k for k in keys):
            raise unused_error(path, "fast-reid", arch, [k for k in keys if ".se." in k])
        missing = [h for h in MGN_HEADS if f"{h}.weight" not in keys or f"{h}.bottleneck.0.weight" not in keys]
        if missing:
            raise CheckpointError(
                f"{path} is a fast-reid {arch} checkpoint without the classifier or neck of "
                f"{', '.join(missing)}; an MGN file has all eight heads {', '.join(MGN_HEADS)}"
            )
        first = state["b1_head.bottleneck.0.weight"]
        embedding = int(first.shape[0]) if first.ndim == 4 else 0
        learned_p = "b1_head.pool_layer.p" in keys
        out: dict[str, torch.Tensor] = {}
        unused = []
        for key, tensor in state.items():
            head, _, rest = key.partition(".")
            if head in MGN_HEADS and rest == "weight":
                out[f"{head}.classifier.weight"] = tensor
            elif head in MGN_HEADS or head in ("backbone", "b1", "b2", "b3"):
                out[key] = tensor
            elif key not in PIXEL_BUFFERS:
                unused.append(key)
        if unused:
            raise unused_error(path, "fast-reid", arch, unused)
        overrides: dict[str, Any] = {
            "MODEL.NAME": f"fastreid_resnet{depth}" + ("_ibn" if ibn else ""),
            "MODEL.LAST_STRIDE": 1, "MODEL.HEAD": "mgn", "MODEL.NECK": "bnneck",
            "MODEL.MGN_EMBEDDING_DIM": embedding, "INPUT.SIZE_TEST": [384, 128],
            **TEST_TRANSFORM, **_pixels(state, path),
        }
        defaults: dict[str, Any] = {}
        warnings: dict[str, str] = {}
        if learned_p:
            overrides["MODEL.POOLING"] = "gem"
        else:
            defaults["MODEL.POOLING"] = "avg"
            warnings["MODEL.POOLING"] = (
                f"{path}: this fast-reid MGN file has no learned GeM p, so its heads pooled by "
                "average (used) or by GeM with a fixed p; for the latter set MODEL.POOLING gem and "
                "MODEL.GEM_P, or its features are those of another pooling"
            )
        return Converted(state=out, overrides=overrides, num_classes=int(state["b1_head.weight"].shape[0]),
                         source=f"fast-reid {arch}", ignored=training_state(outer),
                         defaults=defaults, warnings=warnings)
