"""layumi's Person_reID_baseline_pytorch checkpoints (`model/<name>/net_last.pth`).

Its train.py saves `model.state_dict()` of ft_net (ResNet-50, optionally IBN-a), ft_net_dense
(DenseNet-121) or PCB, bare; swa's `net_average.pth` wraps it in `module.` with `n_averaged`.
Key names (layumi model.py at 82ff40f):

    model.conv1 / model.bn1 / model.layer1..4      -> backbone.*  (torchvision ResNet names)
    model.features.*                               -> backbone.features.*  (DenseNet-121)
    model.fc.* / model.classifier.* (ImageNet fc)  -> not used (the test feature skips them)
    classifier.add_block.{0 Linear, 1 BN}          -> classifier.add_block.*   (MODEL.HEAD layumi)
    classifier.classifier.0 (Linear to classes)    -> classifier.classifier.0
    classifier{i}.add_block / .classifier (PCB)    -> classifier{i}.*          (MODEL.HEAD pcb)

What the state dict cannot tell - the stride of the last stage - comes from the `opts.yaml`
layumi writes beside the file (`stride`); without it layumi's default `--stride 2` is assumed
unless the user's config sets MODEL.LAST_STRIDE, and a warning names that key (PCB always runs
layer4 at stride 1). The test transform is layumi test.py's: bicubic resize (`interpolation=3`)
to 256 x 128 (384 x 192 for PCB), ImageNet mean / std.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from strongreid.errors import CheckpointError
from strongreid.modeling.checkpoint import strip_prefixes
from strongreid.modeling.formats import CHECKPOINT_FORMATS, Converted

logger = logging.getLogger(__name__)

# The ImageNet classifiers layumi leaves inside `model` (torchvision's fc / DenseNet classifier).
_IMAGENET_FC = ("model.fc.", "model.classifier.")
_EXPECTED = (
    "layumi's net_*.pth of ft_net (ResNet-50), ft_net_dense (DenseNet-121) or PCB: a state dict "
    "with model.* backbone keys and classifier.add_block.* (or classifier0..5.*) head keys"
)


def _bare(raw: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a layumi file with the `module.` of DataParallel / AveragedModel removed."""
    return {strip_prefixes(key): value for key, value in raw.items()
            if isinstance(key, str) and isinstance(value, torch.Tensor)}


def _opts(path: Path) -> dict[str, Any]:
    """layumi's opts.yaml beside the checkpoint, or {} when there is none (or it is unreadable)."""
    file = path.parent / "opts.yaml"
    if not file.is_file():
        return {}
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        logger.warning("%s: cannot read %s (%s); using layumi's defaults", path, file, exc)
        return {}
    return data if isinstance(data, dict) else {}


@CHECKPOINT_FORMATS.register("layumi")
class LayumiCheckpoint:
    description = "layumi Person_reID_baseline_pytorch net_*.pth (ft_net, ft_net_dense, PCB)"

    def detect(self, raw: Mapping[str, Any]) -> bool:
        keys = _bare(raw)
        has_backbone = any(k.startswith("model.") for k in keys)
        has_head = any(k.startswith(("classifier.add_block.", "classifier0.add_block.")) for k in keys)
        return has_backbone and has_head

    def convert(self, raw: Mapping[str, Any], path: Path) -> Converted:
        state = _bare(raw)
        if any(k.startswith(("usam_1.", "usam_2.")) for k in state):
            raise CheckpointError(
                f"{path} is a layumi ft_net trained with --usam, which strongreid does not build; "
                f"supported: {_EXPECTED}"
            )
        opts = _opts(path)
        parts = sorted(int(k[len("classifier"):].split(".")[0]) for k in state
                       if k.startswith("classifier") and k.split(".")[0][len("classifier"):].isdigit()
                       and k.endswith(".add_block.1.running_mean"))
        if "model.features.conv0.weight" in state:
            arch, source = "layumi_densenet121", "layumi ft_net_dense"
        elif "model.layer4.0.conv1.weight" in state:
            ibn = "model.layer1.0.bn1.IN.weight" in state
            arch = "resnet50_ibn_a" if ibn else "resnet50"
            source = "layumi PCB" if parts else f"layumi ft_net ({'IBN-a ' if ibn else ''}ResNet-50)"
        else:
            raise CheckpointError(
                f"{path} has layumi's classifier keys but a backbone strongreid does not map "
                f"(keys like {', '.join(list(state)[:3])}); expected {_EXPECTED}"
            )
        converted: dict[str, torch.Tensor] = {}
        ignored: list[str] = []
        for key, tensor in state.items():
            if key.startswith(_IMAGENET_FC) or key == "n_averaged":  # swa's snapshot count
                ignored.append(key)
            elif key.startswith("model."):
                converted["backbone." + key[len("model."):]] = tensor
            else:
                converted[key] = tensor
        overrides: dict[str, Any] = {"MODEL.NAME": arch, "MODEL.POOLING": "avg",
                                     "INPUT.PIXEL_MEAN": [0.485, 0.456, 0.406],
                                     "INPUT.PIXEL_STD": [0.229, 0.224, 0.225],
                                     "INPUT.INTERPOLATION": "bicubic"}
        defaults: dict[str, Any] = {}
        warnings: dict[str, str] = {}
        if parts:
            if parts != list(range(len(parts))):
                raise CheckpointError(f"{path}: PCB part classifiers {parts} are not 0..{len(parts) - 1}")
            head = "classifier0"
            overrides.update({"MODEL.HEAD": "pcb", "MODEL.PCB_PARTS": len(parts),
                              "MODEL.LAST_STRIDE": 1, "INPUT.SIZE_TEST": [384, 192]})
        else:
            head = "classifier"
            overrides.update({"MODEL.HEAD": "layumi", "INPUT.SIZE_TEST": [256, 128]})
            if "stride" in opts:
                overrides["MODEL.LAST_STRIDE"] = int(opts["stride"])
            else:
                defaults["MODEL.LAST_STRIDE"] = 2
                warnings["MODEL.LAST_STRIDE"] = (
                    f"{path}: no opts.yaml with `stride` beside it, and the weights are the same "
                    "at either stride, so the model is built with layumi's default --stride 2. "
                    "If it was trained with --stride 1, set MODEL.LAST_STRIDE 1 (or put its "
                    "opts.yaml beside it): at the wrong stride layer4 pools a map of another "
                    "size, so the features are not the ones layumi's test.py gives and the mAP "
                    "is lower."
                )
        first = state.get(f"{head}.add_block.0.weight")
        if first is None:
            raise CheckpointError(f"{path}: no {head}.add_block.0.weight; expected {_EXPECTED}")
        # add_block.0 is the Linear (2-D weight), or the BN when layumi ran with --linear_num 0.
        width = int(first.shape[0]) if first.ndim == 2 else 0
        overrides["MODEL.PCB_LINEAR_NUM" if parts else "MODEL.LINEAR_NUM"] = width
        classes = state.get(f"{head}.classifier.0.weight")
        if classes is None:
            raise CheckpointError(f"{path}: no {head}.classifier.0.weight; expected {_EXPECTED}")
        if "droprate" in opts:
            overrides["MODEL.DROPRATE"] = float(opts["droprate"])
        return Converted(state=converted, overrides=overrides, num_classes=int(classes.shape[0]),
                         source=source, ignored=ignored, defaults=defaults, warnings=warnings)
