"""CLIP-ReID (Syliz517/CLIP-ReID) files: `torch.save(model.state_dict())` of its models.

Both its baseline (`train.py`, model/make_model.py) and the two-stage CLIP-ReID
(`train_clipreid.py`) save the whole model: `image_encoder.*` (CLIP's image tower with OpenAI's
names), `bottleneck`, `bottleneck_proj`, `classifier`, `classifier_proj`, `cv_embed` with side
information, and for CLIP-ReID also the text side, `prompt_learner.*` (the learnt per-identity
tokens) and `text_encoder.*` (CLIP's text transformer). The text side only trains the image
tower; the test feature never reads it, so those tensors are listed as ignored and every
image-side tensor is used (MODEL.HEAD 'visual_clipreid' on 'clip:ViT-B-16' / 'clip:RN50').

Read off the keys and shapes:

    tower        image_encoder.proj -> ViT (width, patch, depth, output width from the shapes);
                 image_encoder.attnpool.* -> ModifiedResNet (stage depths, width)
    grid, size   ViT: positional-embedding rows = 1 + h*w with h = (H - patch) // stride + 1,
                 matched against CLIP-ReID's sizes (256x128 persons, 256x256 vehicles) and
                 strides (16, or 12 with overlapping patches); RN: 1 + (H/16)*(W/16), last stride 1
    SIE          cv_embed rows -> MODEL.SIE_CAMERA_NUM

Test transform, from its configs and `make_dataloader`: Resize(SIZE_TEST) with torchvision's
default (bilinear), mean/std 0.5 for the ViT configs and ImageNet's for the CNN (RN50) configs.
Its person configs test before the BNNecks (TEST.NECK_FEAT 'before'); the README's SIE command
uses MODEL.SIE_COE 1.0. Both are guesses the file cannot confirm (warnings say so).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from strongreid.errors import CheckpointError
from strongreid.modeling.formats import CHECKPOINT_FORMATS, Converted
from strongreid.modeling.formats._peers import (
    block_count,
    imagenet_pixels,
    tensors_of,
    training_state,
    unused_error,
)

ENCODER = "image_encoder."
HEAD_KEYS = ("bottleneck.", "bottleneck_proj.", "classifier.", "classifier_proj.")
TEXT_PREFIXES = ("prompt_learner.", "text_encoder.")
# CLIP-ReID's input sizes (persons, vehicles) and patch strides, most common first.
SIZES = ((256, 128), (256, 256), (384, 128))
STRIDES = (16, 12)
VIT_B16 = {"width": 768, "layers": 12, "heads": 12, "output_dim": 512, "patch_size": 16, "stride": 16}
RN50 = {"width": 64, "layers": [3, 4, 6, 3], "heads": 32, "output_dim": 1024}


def _state(raw: Mapping[str, Any]):
    return tensors_of(raw, ("state_dict", "model"))


@CHECKPOINT_FORMATS.register("clipreid")
class CLIPReIDFormat:
    description = "CLIP-ReID ViT-B/16 and RN50 files (baseline and two-stage CLIP-ReID)"

    def detect(self, raw: Mapping[str, Any]) -> bool:
        state, _ = _state(raw)
        return (f"{ENCODER}conv1.weight" in state
                and ("bottleneck_proj.weight" in state or "classifier_proj.weight" in state))

    def convert(self, raw: Mapping[str, Any], path: Path) -> Converted:
        state, outer = _state(raw)
        if not self.detect(raw):
            raise CheckpointError(
                f"{path} is not a CLIP-ReID file: it has no image_encoder.conv1.weight with "
                "bottleneck_proj / classifier_proj (MODEL.CHECKPOINT_FORMAT is 'clipreid'; set "
                "it to 'auto' to detect the format)"
            )
        if f"{ENCODER}proj" in state:
            name, spec, size, source = self._vit(state, path)
        elif f"{ENCODER}attnpool.positional_embedding" in state:
            name, spec, size, source = self._rn(state, path)
        else:
            raise CheckpointError(
                f"{path} is a CLIP-ReID file whose image encoder is neither CLIP's ViT (no "
                "image_encoder.proj) nor its ModifiedResNet (no image_encoder.attnpool.*); "
                "strongreid reads ViT-B/16 and RN50 files"
            )
        out: dict[str, torch.Tensor] = {}
        ignored, unused = [], []
        for key, tensor in state.items():
            tensor = tensor.float() if tensor.is_floating_point() else tensor
            if key.startswith(ENCODER):
                out["backbone.visual." + key[len(ENCODER):]] = tensor
            elif key.startswith(HEAD_KEYS) or key == "cv_embed":
                out[key] = tensor
            elif key.startswith(TEXT_PREFIXES):
                ignored.append(f"{key} (text side: trains the image tower, not used by its test feature)")
            else:
                unused.append(key)
        if unused:
            raise unused_error(path, "CLIP-ReID", source, unused)
        if "classifier.weight" not in state:
            raise CheckpointError(f"{path} is a CLIP-ReID {source} file without classifier.weight; "
                                  "it is not a whole saved model")
        base = VIT_B16 if name == "ViT-B-16" else RN50
        kwargs = {k: v for k, v in spec.items() if base[k] != v}
        cameras = int(state["cv_embed"].shape[0]) if "cv_embed" in state else 0
        pixels = ({"INPUT.PIXEL_MEAN": [0.5, 0.5, 0.5], "INPUT.PIXEL_STD": [0.5, 0.5, 0.5]}
                  if name == "ViT-B-16" else imagenet_pixels())
        overrides = {
            "MODEL.NAME": f"clip:{name}", "MODEL.HEAD": "visual_clipreid", "MODEL.NECK": "bnneck",
            # How it trained (softmax ID loss, no center loss), which the head checks.
            "MODEL.ID_LOSS_TYPE": "softmax", "MODEL.IF_WITH_CENTER": "no",
            "MODEL.LAST_STRIDE": 1, "MODEL.TIMM_KWARGS": _flow(kwargs),
            "MODEL.SIE_CAMERA": bool(cameras), "MODEL.SIE_CAMERA_NUM": cameras,
            "INPUT.SIZE_TRAIN": list(size), "INPUT.SIZE_TEST": list(size),
            # CLIP-ReID's test transform: T.Resize(size), torchvision's default filter.
            "INPUT.INTERPOLATION": "bilinear", **pixels,
        }
        defaults: dict[str, Any] = {"TEST.NECK_FEAT": "before"}
        warnings = {"TEST.NECK_FEAT": (
            f"{path}: CLIP-ReID files do not record where they test; using its configs' "
            "TEST.NECK_FEAT 'before' (the features before the BNNecks). Set TEST.NECK_FEAT "
            "'after' if the file was evaluated after them.")}
        if cameras:
            defaults["MODEL.SIE_COE"] = 1.0
            warnings["MODEL.SIE_COE"] = (
                f"{path}: the camera-embedding weight is not in the file; using the README's "
                "MODEL.SIE_COE 1.0 (CLIP-ReID's config default is 3.0). A wrong value scales "
                "the camera term of every feature: set MODEL.SIE_COE to the training run's.")
        return Converted(state=out, overrides=overrides,
                         num_classes=int(state["classifier.weight"].shape[0]),
                         source=f"CLIP-ReID {source}", ignored=ignored + training_state(outer),
                         defaults=defaults, warnings=warnings)

    @staticmethod
    def _vit(state: dict, path: Path) -> tuple[str, dict, tuple[int, int], str]:
        conv = state[f"{ENCODER}conv1.weight"]
        width, patch = int(conv.shape[0]), int(conv.shape[-1])
        layers = block_count(list(state), f"{ENCODER}transformer.resblocks")
        cells = int(state[f"{ENCODER}positional_embedding"].shape[0]) - 1
        found = _vit_grid(cells, patch)
        if found is None:
            raise CheckpointError(
                f"{path}: a CLIP-ReID ViT whose positional embedding has {cells} patch tokens, "
                f"which no input size and stride strongreid knows give (sizes "
                f"{', '.join(f'{h}x{w}' for h, w in SIZES)}, strides {STRIDES}); convert it "
                "with CLIP-ReID or report the size it was trained at"
            )
        size, stride = found
        spec = {"width": width, "layers": layers, "heads": max(1, width // 64),
                "output_dim": int(state[f"{ENCODER}proj"].shape[1]), "patch_size": patch,
                "stride": stride}
        return "ViT-B-16", spec, size, f"ViT (width {width}, {layers} blocks, patch {patch}, stride {stride})"

    @staticmethod
    def _rn(state: dict, path: Path) -> tuple[str, dict, tuple[int, int], str]:
        keys = list(state)
        layers = [block_count(keys, f"{ENCODER}layer{i}") for i in range(1, 5)]
        width = int(state[f"{ENCODER}layer1.0.conv1.weight"].shape[0])
        cells = int(state[f"{ENCODER}attnpool.positional_embedding"].shape[0]) - 1
        size = next(((h, w) for h, w in SIZES if (h // 16) * (w // 16) == cells), None)
        if size is None:
            side = math.isqrt(cells // 2)
            if 2 * side * side != cells:
                raise CheckpointError(
                    f"{path}: a CLIP-ReID RN whose attention pooling has {cells} positions, "
                    "which no known input size gives at last stride 1"
                )
            size = (32 * side, 16 * side)
        spec = {"width": width, "layers": layers, "heads": width * 32 // 64,
                "output_dim": int(state[f"{ENCODER}attnpool.c_proj.weight"].shape[0])}
        arch = "RN50" if layers == RN50["layers"] and width == 64 else f"RN (stages {layers}, width {width})"
        return "RN50", spec, size, arch


def _vit_grid(cells: int, patch: int) -> tuple[tuple[int, int], int] | None:
    """(input size, stride) whose token grid has `cells` cells: CLIP-ReID's sizes and strides
    first, else a 2:1 person crop at stride = patch."""
    for stride in STRIDES:
        for h, w in SIZES:
            if h >= patch and w >= patch and \
                    ((h - patch) // stride + 1) * ((w - patch) // stride + 1) == cells:
                return (h, w), stride
    side = math.isqrt(cells // 2)
    if side and 2 * side * side == cells:
        return (2 * side * patch, side * patch), patch
    return None


def _flow(kwargs: dict) -> str:
    """A dict as MODEL.TIMM_KWARGS' one-line YAML mapping ('' when empty)."""
    if not kwargs:
        return ""
    return "{" + ", ".join(f"{k}: {list(v) if isinstance(v, (list, tuple)) else v}"
                           for k, v in kwargs.items()) + "}"
