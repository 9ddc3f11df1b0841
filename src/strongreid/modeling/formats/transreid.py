"""TransReID (damo-cv/TransReID) checkpoints: `transformer_120.pth` and its released models.

TransReID saves `model.state_dict()` bare (`module.` in front under DistributedDataParallel):

    base.cls_token, base.pos_embed (1 x 1+N x D), base.sie_embed (R x 1 x D, with SIE),
    base.patch_embed.proj, base.blocks.<i>.*, base.norm, base.fc (Linear(D, 1000), unused)
    bottleneck, classifier                      (every model)
    b1.{0,1}, b2.{0,1}, bottleneck_<i>, classifier_<i>, i = 1..4    (JPM)

Read off the file: the width (cls_token), depth (blocks), MLP ratio (fc1 rows), qkv bias, the
JPM branches, the SIE table's rows and the class count. The patch grid is not stored; the
number of positions N tells the input size and stride among those TransReID's configs use
(256x128 / 384x128 persons, 256x256 vehicles; stride 16, 14, 12 or 11), which all give
different N. TransReID tests at that size with `T.Resize(size)`: bilinear, mean/std 0.5.
With JPM its base keeps a last block and final norm that the forward never runs: listed as
ignored. What the file cannot tell is guessed, as TransReID's published configs set it:
TEST.NECK_FEAT 'before', camera-only SIE with one row per camera, JPM shift 5 (8 for the
256x256 vehicle models), and for a transformer of no published shape the head count of its
type's width (64-wide heads at another width).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from strongreid.errors import CheckpointError
from strongreid.modeling.backbones.transreid import PATCH, PREFIX, TYPES, patch_grid
from strongreid.modeling.formats import CHECKPOINT_FORMATS, Converted
from strongreid.modeling.formats._peers import block_count, tensors_of, training_state, unused_error

# Input sizes and strides of TransReID's configs: no two give the same number of patches.
SIZES = ((256, 128), (384, 128), (256, 256))
STRIDES = (16, 14, 12, 11)
GEOMETRY = {patch_grid(size, (s, s))[0] * patch_grid(size, (s, s))[1]: (size, s)
            for size in SIZES for s in STRIDES}
MARKERS = ("base.cls_token", "base.pos_embed", "base.patch_embed.proj.weight")
HEAD = re.compile(r"^(bottleneck|classifier)(_\d+)?\.")
K = "MODEL.TRANSREID"


def _state(raw: Mapping[str, Any]):
    return tensors_of(raw, ("state_dict", "model"))


def _type_of(dim: int, qkv_bias: bool, mlp_ratio: float, depth: int) -> tuple[str, bool]:
    """The TransReID transformer type of this shape and whether it is exactly that type."""
    name = ("vit_small_patch16_224" if not qkv_bias else
            "deit_small_patch16_224" if dim == 384 else "vit_base_patch16_224")
    spec = TYPES[name]
    exact = (spec.embed_dim, spec.qkv_bias, spec.mlp_ratio, spec.depth) == (dim, qkv_bias, mlp_ratio, depth)
    return name, exact


@CHECKPOINT_FORMATS.register("transreid")
class TransReIDFormat:
    description = "TransReID (damo-cv/TransReID) ViT / DeiT files, with or without SIE and JPM"

    def detect(self, raw: Mapping[str, Any]) -> bool:
        state, _ = _state(raw)
        return all(k in state for k in MARKERS)

    def convert(self, raw: Mapping[str, Any], path: Path) -> Converted:
        state, outer = _state(raw)
        missing = [k for k in MARKERS if k not in state]
        if missing:
            raise CheckpointError(f"{path} is not a TransReID checkpoint: it has no {', '.join(missing)} "
                                  "(MODEL.CHECKPOINT_FORMAT is 'transreid'; set 'auto' to detect the format)")
        keys = set(state)
        dim = int(state["base.cls_token"].shape[-1])
        depth = block_count(keys, "base.blocks")
        hidden = int(state["base.blocks.0.mlp.fc1.weight"].shape[0])
        qkv_bias = "base.blocks.0.attn.qkv.bias" in keys
        kernel = tuple(state["base.patch_embed.proj.weight"].shape[-2:])
        if kernel != (PATCH, PATCH) or "base.patch_embed.backbone.conv1.weight" in keys:
            raise CheckpointError(f"{path} is a TransReID model with {kernel} patches or a hybrid "
                                  "CNN stem; strongreid builds TransReID's 16x16 patch transformers")
        patches = int(state["base.pos_embed"].shape[1]) - 1
        if patches not in GEOMETRY:
            known = ", ".join(f"{h}x{w} stride {s}: {n}" for n, ((h, w), s) in sorted(GEOMETRY.items()))
            raise CheckpointError(
                f"{path} is a TransReID model with {patches} patch positions, which none of "
                f"TransReID's input sizes and strides gives ({known}); strongreid reads those"
            )
        size, stride = GEOMETRY[patches]
        jpm = "b1.0.norm1.weight" in keys
        local = sorted({int(m.group(2)[1:]) for k in keys if (m := HEAD.match(k)) and m.group(2)})
        name, exact = _type_of(dim, qkv_bias, hidden / dim, depth)

        out, ignored, unused = {}, training_state(outer), []
        dead = (f"base.blocks.{depth - 1}.", "base.norm.") if jpm else ()
        for key, tensor in state.items():
            if key.startswith("base.fc."):
                ignored.append(f"{key} (TransReID's base keeps an unused 1000-class fc)")
            elif dead and key.startswith(dead):
                ignored.append(f"{key} (TransReID's JPM forward never runs its base's last block and norm)")
            elif key.startswith("base."):
                out["backbone." + key[len("base."):]] = tensor
            elif key.startswith(("b1.", "b2.")):
                out["backbone." + key] = tensor
            elif HEAD.match(key):
                out[key] = tensor
            else:
                unused.append(key)
        if unused:
            raise unused_error(path, "TransReID", name, unused)

        overrides: dict[str, Any] = {
            "MODEL.NAME": PREFIX + name, "MODEL.HEAD": "transreid",
            f"{K}.EMBED_DIM": dim, f"{K}.DEPTH": depth, f"{K}.MLP_RATIO": hidden / dim,
            f"{K}.STRIDE_SIZE": [stride, stride], f"{K}.JPM": jpm,
            f"{K}.DIVIDE_LENGTH": len(local) if jpm else 4,
            "INPUT.SIZE_TRAIN": list(size), "INPUT.SIZE_TEST": list(size),
            # TransReID's val_transforms: T.Resize(SIZE_TEST) (bilinear), ToTensor, Normalize 0.5.
            "INPUT.INTERPOLATION": "bilinear",
            "INPUT.PIXEL_MEAN": [0.5, 0.5, 0.5], "INPUT.PIXEL_STD": [0.5, 0.5, 0.5],
        }
        defaults: dict[str, Any] = {"TEST.NECK_FEAT": "before"}
        warnings = {"TEST.NECK_FEAT": (
            f"{path}: TransReID files do not record TEST.NECK_FEAT; 'before' (every published "
            "TransReID config) is used: set TEST.NECK_FEAT 'after' if the model was tested so")}
        if exact:
            overrides[f"{K}.NUM_HEADS"] = TYPES[name].num_heads
        else:
            # The type's heads at its own width (a shallower ViT-B keeps 12), else 64-wide heads.
            heads = TYPES[name].num_heads if dim == TYPES[name].embed_dim else max(dim // 64, 1)
            defaults[f"{K}.NUM_HEADS"] = heads
            warnings[f"{K}.NUM_HEADS"] = (
                f"{path}: a TransReID transformer of no published shape ({dim} wide, {depth} "
                f"blocks); its head count is not stored and {heads} is assumed: set "
                f"{K}.NUM_HEADS if it was built otherwise")
        if "base.sie_embed" in keys:
            rows = int(state["base.sie_embed"].shape[0])
            defaults.update({f"{K}.SIE_CAMERA": True, f"{K}.CAMERA_NUM": rows,
                             f"{K}.SIE_VIEW": False, f"{K}.VIEW_NUM": 0})
            warnings[f"{K}.SIE_CAMERA"] = (
                f"{path}: its SIE table has {rows} rows, taken as {rows} cameras (TransReID's person "
                f"configs); for camera x view SIE (VeRi) set {K}.SIE_VIEW True, CAMERA_NUM and VIEW_NUM")
        else:
            overrides.update({f"{K}.SIE_CAMERA": False, f"{K}.SIE_VIEW": False})
        if jpm:
            shift = 8 if size == (256, 256) else 5
            defaults.update({f"{K}.SHIFT_NUM": shift, f"{K}.SHUFFLE_GROUP": 2, f"{K}.RE_ARRANGE": True})
            warnings[f"{K}.SHIFT_NUM"] = (
                f"{path}: TransReID files do not record the JPM re-arrangement; shift {shift}, 2 "
                f"groups ({'vehicle' if shift == 8 else 'person'} configs) are used: set {K}.SHIFT_NUM, "
                "SHUFFLE_GROUP, RE_ARRANGE if it was trained otherwise")
        what = "ViT-B/16" if name == "vit_base_patch16_224" else name
        extras = [f"stride {stride}"] + (["SIE"] if "base.sie_embed" in keys else []) + (["JPM"] if jpm else [])
        return Converted(state=out, overrides=overrides,
                         num_classes=int(state["classifier.weight"].shape[0]),
                         source=f"TransReID {what} ({', '.join(extras)})", ignored=ignored,
                         defaults=defaults, warnings=warnings)
