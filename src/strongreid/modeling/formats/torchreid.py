"""torchreid (deep-person-reid) model-zoo and training files.

torchreid saves `{"state_dict": model.state_dict(), "epoch", "rank1", "optimizer", ...}` as
`model.pth.tar-<epoch>`; its model zoo and ImageNet files are bare state dicts; either may carry
DataParallel's `module.` prefix. The keys are the model's own: OSNet (`conv1.conv.weight`,
`conv2.0.conv2a...`, OSNet-AIN `pool2...`) or ResNet (`conv1.weight`, `layer1...`; IBN-a
`layer1.0.bn1.IN`, IBN-b an affine instance-norm stem `bn1` and `layer1.2.IN`), then
`fc.0/fc.1` (Linear + BatchNorm1d, 512-d: OSNet, resnet50_fc512) and `classifier` (Linear with
bias). The architecture is read off the keys and shapes:

    OSNet width      conv1.conv.weight rows: 64 x1_0, 48 x0_75, 32 x0_5, 16 x0_25
    OSNet variant    pool2.* -> osnet_ain_*;  conv2.0.IN.* (no pool2) -> osnet_ibn_x1_0
    ResNet depth     block type and layer2/layer3 block counts
    ResNet-IBN       layer1.0.bn1.IN.* -> resnet50_ibn_a; stem bn1 without running statistics
                     and layer1.<last>.IN.* -> resnet50_ibn_b (layer4 at stride 2 for both)
    fc               fc.0.weight rows -> MODEL.LINEAR_NUM (0 without fc)
    last stride      OSNet 1 (the published stride 16); ResNet 1 with fc (resnet50_fc512), else 2

and the model is strongreid's MODEL.HEAD 'torchreid' (pool -> fc -> classifier) on that backbone;
its test feature is the fc output (the pooled map without fc), as torchreid's. The test transform
is torchreid's build_transforms: Resize((256, 128)) with torchvision's default filter (bilinear),
ImageNet mean / std.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

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

OSNET_WIDTHS = {64: "x1_0", 48: "x0_75", 32: "x0_5", 16: "x0_25"}
HEAD_PREFIXES = ("fc.", "classifier.")


def _state(raw: Mapping[str, Any]):
    return tensors_of(raw, ("state_dict",))


def _family(keys: set[str]) -> str | None:
    if "conv1.conv.weight" in keys:
        return "osnet"
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        return "resnet"
    return None


def _ibn_variant(keys: set[str]) -> str | None:
    """'a' for IBN in the blocks' bn1 (`layer1.0.bn1.IN`), 'b' for an instance-norm stem (no
    running statistics) with `IN` after layer1's last block, else None."""
    if "layer1.0.bn1.IN.weight" in keys:
        return "a"
    last = block_count(keys, "layer1") - 1
    if "bn1.running_mean" not in keys and f"layer1.{last}.IN.weight" in keys:
        return "b"
    return None


@CHECKPOINT_FORMATS.register("torchreid")
class TorchreidFormat:
    description = "torchreid (deep-person-reid) OSNet / ResNet / ResNet-IBN files: model zoo, model.pth.tar-N"

    def detect(self, raw: Mapping[str, Any]) -> bool:
        state, _ = _state(raw)
        keys = set(state)
        # A strongreid / reid-strong-baseline state dict prefixes its backbone; torchreid does not.
        return ("classifier.weight" in keys and _family(keys) is not None
                and not any(k.startswith(("backbone.", "base.")) for k in keys))

    def convert(self, raw: Mapping[str, Any], path: Path) -> Converted:
        state, outer = _state(raw)
        keys = set(state)
        family = _family(keys)
        if family is None or "classifier.weight" not in keys:
            raise CheckpointError(
                f"{path} is not a torchreid OSNet / ResNet file: it has no conv1.conv.weight / "
                "conv1.weight + layer1.* and classifier.weight (MODEL.CHECKPOINT_FORMAT is "
                "'torchreid'; set it to 'auto' to detect the format)"
            )
        if family == "osnet":
            name, arch, last_stride = self._osnet(state, keys, path)
        else:
            depth = resnet_depth(keys)
            ibn = _ibn_variant(keys)
            if depth is None or (ibn and depth not in (50, 101)):
                raise CheckpointError(
                    f"{path} is a torchreid checkpoint of a ResNet{'-IBN-' + ibn if ibn else ''} of "
                    "a depth strongreid does not build; it reads torchreid's resnet18/34/50/101/152 "
                    "(with or without fc512), resnet50_ibn_a / resnet50_ibn_b and osnet_* files"
                )
            if ibn:
                # torchreid's resnet50_ibn_a / _b: layer4 at stride 2, as IBN-Net builds them.
                name = arch = f"resnet{depth}_ibn_{ibn}"
                last_stride = 2
            else:
                name = f"resnet{depth}"
                arch = name + ("_fc512" if "fc.0.weight" in keys else "")
                # torchreid builds resnet50_fc512 with last stride 1, the plain ResNets with 2.
                last_stride = 1 if "fc.0.weight" in keys else 2
        fc_dim = int(state["fc.0.weight"].shape[0]) if "fc.0.weight" in keys else 0
        out: dict = {}
        unused = []
        for key, tensor in state.items():
            if key.startswith(HEAD_PREFIXES):
                if key.startswith("fc.") and not key.startswith(("fc.0.", "fc.1.")):
                    unused.append(key)  # a second fc layer (fc_dims with two entries)
                out[key] = tensor
            else:
                out["backbone." + key] = tensor
        if unused:
            raise unused_error(path, "torchreid", arch, unused)
        overrides = {
            "MODEL.NAME": name, "MODEL.LAST_STRIDE": last_stride, "MODEL.HEAD": "torchreid",
            "MODEL.LINEAR_NUM": fc_dim, "MODEL.POOLING": "avg", "INPUT.SIZE_TEST": [256, 128],
            # torchreid's test transform: Resize((h, w)) with torchvision's default, bilinear.
            "INPUT.INTERPOLATION": "bilinear", **imagenet_pixels(),
        }
        return Converted(state=out, overrides=overrides,
                         num_classes=int(state["classifier.weight"].shape[0]),
                         source=f"torchreid {arch}",
                         ignored=training_state(outer))

    @staticmethod
    def _osnet(state: dict, keys: set[str], path: Path) -> tuple[str, str, int]:
        stem = int(state["conv1.conv.weight"].shape[0])
        width = OSNET_WIDTHS.get(stem)
        ain = any(k.startswith("pool2.") for k in keys)
        ibn = not ain and "conv2.0.IN.weight" in keys
        variant = "ain_" if ain else "ibn_" if ibn else ""
        if width is None or (ibn and width != "x1_0"):
            raise CheckpointError(
                f"{path} is a torchreid OSNet{'-IBN' if ibn else '-AIN' if ain else ''} with a "
                f"{stem}-channel stem, not one of the published sizes strongreid builds "
                "(x1_0, x0_75, x0_5, x0_25; OSNet-IBN x1_0 only)"
            )
        name = f"osnet_{variant}{width}"
        return name, name, 1
