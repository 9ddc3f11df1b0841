"""What `strongreid export --target boxmot` adds: BoxMOT's input convention, its sidecar, the snippet.

BoxMOT 25 (AGPL, an optional extra) is never imported here: these are facts read from its
ReID backends (boxmot/reid/backends/base_backend.py, core/crops.py, core/artifacts.py):

* the runtime is chosen by the file suffix only (`.onnx`, `.torchscript`, ...);
* every crop is cut from the BGR frame, resized with cv2 INTER_LINEAR to the model's H x W,
  turned to RGB, divided by 255 and normalised with the ImageNet mean/std, hard-coded;
* the H x W comes from the sidecar `<file>.metadata.json` (`model_kwargs.img_size`); the ONNX
  backend replaces it with the graph's static size, TorchScript uses the sidecar or 256 x 128.

The resize cannot be folded away: BoxMOT resizes before the graph, bilinearly without
antialiasing, while strongreid's test transform resizes with INPUT.INTERPOLATION through PIL
(antialiased). `preprocessing_check` measures what that costs on the config's test split, with
`boxmot_crop_batch`, BoxMOT's crop preparation restated (tests/test_tracking.py checks it against
BoxMOT's own code, bit for bit).

So a model trained with another INPUT.PIXEL_MEAN/STD gets the difference as a per-channel affine
map in front of the graph: with BoxMOT's input b = (p - m_i) / s_i and the model's x = (p - m) / s,
x = b * (s_i / s) + (m_i - m) / s, exact in floating point up to rounding. It is a separate
Mul/Add rather than folded into the first convolution because the convolution's zero padding
would then pad with the wrong value.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from yacs.config import CfgNode

from strongreid.errors import ConfigError, StrongReIDError
from strongreid.paths import atomic_write_text

logger = logging.getLogger("strongreid")

# torchvision's ImageNet statistics, which BoxMOT applies to every crop (RGB, on pixel / 255).
BOXMOT_PIXEL_MEAN = (0.485, 0.456, 0.406)
BOXMOT_PIXEL_STD = (0.229, 0.224, 0.225)
# File suffix -> strongreid export format: BoxMOT picks its runtime from the suffix.
BOXMOT_SUFFIXES = {".onnx": "onnx", ".torchscript": "torchscript", ".xml": "openvino"}
# How BoxMOT resizes every crop (reid/core/preprocessing.py: resize).
BOXMOT_RESIZE = "cv2 INTER_LINEAR (bilinear, no antialiasing)"
SIDECAR_SCHEMA_VERSION = 1
MODEL_KWARGS_SCHEMA_VERSION = 1


class InputAdapter(nn.Module):
    """BoxMOT-normalised crops -> the model's normalisation: x = b * scale + shift per channel."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.view(1, 3, 1, 1).float())
        self.register_buffer("shift", shift.view(1, 3, 1, 1).float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.scale + self.shift


def input_adapter(cfg: CfgNode) -> InputAdapter | None:
    """The affine map from BoxMOT's ImageNet input to INPUT.PIXEL_MEAN/STD, None when they agree."""
    mean = [float(v) for v in cfg.INPUT.PIXEL_MEAN]
    std = [float(v) for v in cfg.INPUT.PIXEL_STD]
    if len(mean) != 3 or len(std) != 3:
        raise ConfigError(
            f"--target boxmot needs 3-channel INPUT.PIXEL_MEAN/STD (BoxMOT feeds RGB crops), got "
            f"{mean} / {std}"
        )
    if mean == list(BOXMOT_PIXEL_MEAN) and std == list(BOXMOT_PIXEL_STD):
        return None
    # float64 for the coefficients, so the only rounding is the fp32 Mul/Add in the graph.
    m, s = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    mi, si = torch.tensor(BOXMOT_PIXEL_MEAN, dtype=torch.float64), torch.tensor(BOXMOT_PIXEL_STD,
                                                                               dtype=torch.float64)
    return InputAdapter(si / s, (mi - m) / s)


class BoxMOTModel(nn.Module):
    """The exported graph for BoxMOT: input adapter (if any), then the strongreid inference model."""

    def __init__(self, inference: nn.Module, adapter: InputAdapter | None) -> None:
        super().__init__()
        self.adapter = adapter
        self.inference = inference

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.adapter is not None:
            images = self.adapter(images)
        return self.inference(images)


def boxmot_format(out: str | os.PathLike, fmt: str | None) -> str:
    """The export format BoxMOT will pick for `out`; refuses a suffix or format it cannot use."""
    suffix = Path(out).suffix.lower()
    if suffix not in BOXMOT_SUFFIXES:
        raise ConfigError(
            f"--out {out}: BoxMOT chooses its runtime from the file suffix; name the file "
            f"NAME.onnx (recommended: the crop size is read from the graph), NAME.torchscript or "
            "NAME.xml (OpenVINO IR)"
        )
    wanted = BOXMOT_SUFFIXES[suffix]
    if fmt is None or fmt == wanted or (suffix == ".onnx" and fmt == "onnx-int8"):
        return fmt or wanted
    if fmt in BOXMOT_SUFFIXES.values():
        other = {v: k for k, v in BOXMOT_SUFFIXES.items()}[fmt]
        raise ConfigError(f"--format {fmt} with --out {out}: BoxMOT reads a {suffix} file as "
                          f"{wanted}; use --format {wanted} or the suffix {other}")
    raise ConfigError(f"--format {fmt}: BoxMOT loads onnx, onnx-int8, torchscript or openvino "
                      "exports of a strongreid model")


def sidecar_path(out: str | os.PathLike) -> Path:
    """Where BoxMOT looks for an artifact's metadata: `<file>.metadata.json`."""
    out = Path(out)
    return out.with_name(out.name + ".metadata.json")


def sidecar(cfg: CfgNode, check: dict[str, Any] | None = None) -> dict:
    """The metadata BoxMOT 25 reads (schema 1): the crop size, and the preprocessing it must use;
    `check` (from `preprocessing_check`) is stored as `preprocessing_check` when given."""
    height, width = (int(v) for v in cfg.INPUT.SIZE_TEST)
    meta = {
        "schema_version": SIDECAR_SCHEMA_VERSION,
        "model_kwargs_schema_version": MODEL_KWARGS_SCHEMA_VERSION,
        "model_kwargs": {"img_size": [height, width]},
        # strongreid's test transform stretches the crop to H x W; BoxMOT's 'resize' does the same.
        "preprocess": "resize",
        # Ignored by BoxMOT, for people reading the file.
        "producer": "strongreid",
        "arch": str(cfg.MODEL.NAME),
        "pixel_mean_folded": [float(v) for v in cfg.INPUT.PIXEL_MEAN],
        "pixel_std_folded": [float(v) for v in cfg.INPUT.PIXEL_STD],
        # The filter the model was tested with; BoxMOT always resizes with cv2 INTER_LINEAR.
        "interpolation": str(cfg.INPUT.INTERPOLATION),
        "boxmot_resize": BOXMOT_RESIZE,
        "flip_aug": bool(cfg.TEST.FLIP_AUG),
        "multi_scale": [float(v) for v in cfg.TEST.MULTI_SCALE],
    }
    if check is not None:
        meta["preprocessing_check"] = check
    return meta


def write_sidecar(out: str | os.PathLike, cfg: CfgNode, check: dict[str, Any] | None = None) -> Path:
    """Write `<out>.metadata.json` atomically; returns its path."""
    return atomic_write_text(sidecar_path(out),
                             json.dumps(sidecar(cfg, check), indent=2, sort_keys=True) + "\n")


def boxmot_crop_batch(bgr_crops: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """What BoxMOT feeds a ReID graph for these BGR uint8 crops (its default 'resize'
    preprocessing): cv2.resize to W x H with INTER_LINEAR, BGR -> RGB, / 255, minus the ImageNet
    mean, over its std, as N x 3 x H x W float32 in the same operation order."""
    import cv2

    height, width = size
    batch = torch.empty((len(bgr_crops), 3, height, width), dtype=torch.float32)
    for i, crop in enumerate(bgr_crops):
        resized = cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=cv2.INTER_LINEAR)
        rgb = cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)
        batch[i] = torch.from_numpy(rgb).to(torch.float32).permute(2, 0, 1)
    mean = torch.tensor(BOXMOT_PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(BOXMOT_PIXEL_STD).view(1, 3, 1, 1)
    return batch.div_(255.0).sub_(mean).div_(std)


def preprocessing_check(cfg: CfgNode, model: nn.Module, graph: nn.Module,
                        batch_size: int = 64) -> dict[str, Any]:
    """The model on the config's test split fed two ways: strongreid's test transform into
    `model`, and BoxMOT's crop preparation into `graph` (the BoxMOT export). Returns both mAP /
    rank-1 (fractions) and the per-image cosine of the two features; raises StrongReIDError
    when the split or OpenCV is not available."""
    import importlib.util

    from strongreid.data import build_transforms, read_image
    from strongreid.data.splits import load_splits
    from strongreid.evaluation import evaluate_from_config

    if importlib.util.find_spec("cv2") is None:
        raise StrongReIDError("OpenCV (cv2, installed with BoxMOT) is not importable")
    splits = load_splits(cfg, need_train=False)
    records = list(splits.query) + list(splits.gallery)
    size = (int(cfg.INPUT.SIZE_TEST[0]), int(cfg.INPUT.SIZE_TEST[1]))
    transform = build_transforms(cfg, is_train=False)
    logger.info("measuring the export under BoxMOT's preprocessing on %d test images", len(records))
    ours, theirs = [], []
    for start in range(0, len(records), batch_size):
        images = [read_image(r.path) for r in records[start:start + batch_size]]
        x = torch.stack([transform(img) for img in images])
        crops = [np.asarray(img)[:, :, ::-1] for img in images]  # the same pixels, as BGR
        with torch.no_grad():
            ours.append(model(x).float())
            theirs.append(graph(boxmot_crop_batch(crops, size)).float())
    feats = {"strongreid": torch.cat(ours), "boxmot": torch.cat(theirs)}
    pids = np.array([r.pid for r in records])
    cams = np.array([r.camid for r in records])
    nq = len(splits.query)
    report: dict[str, Any] = {"dataset": splits.test_name, "num_query": nq,
                              "num_gallery": len(records) - nq,
                              "model_resize": f"{cfg.INPUT.INTERPOLATION} (PIL)",
                              "boxmot_resize": BOXMOT_RESIZE}
    for name, f in feats.items():
        res = evaluate_from_config(cfg, f[:nq], f[nq:], pids[:nq], pids[nq:], cams[:nq], cams[nq:])["plain"]
        report[f"mAP_{name}"], report[f"rank1_{name}"] = float(res.mAP), float(res.cmc[0])
    cos = torch.nn.functional.cosine_similarity(feats["strongreid"], feats["boxmot"], dim=1)
    report["cosine_mean"], report["cosine_min"] = float(cos.mean()), float(cos.min())
    return report


def describe_check(report: dict[str, Any]) -> list[str]:
    """The lines `strongreid export --target boxmot` prints about a `preprocessing_check`."""
    change = 100 * (report["mAP_boxmot"] - report["mAP_strongreid"])
    return [
        f"preprocessing: the model was tested with {report['model_resize']} resizing; BoxMOT "
        f"resizes crops with {report['boxmot_resize']}",
        f"measured on the {report['dataset']} test split ({report['num_query']} query, "
        f"{report['num_gallery']} gallery): mAP {100 * report['mAP_strongreid']:.1f} with "
        f"strongreid's preprocessing, {100 * report['mAP_boxmot']:.1f} with BoxMOT's ({change:+.1f}); "
        f"rank-1 {100 * report['rank1_strongreid']:.1f} -> {100 * report['rank1_boxmot']:.1f}; "
        f"feature cosine mean {report['cosine_mean']:.4f}, min {report['cosine_min']:.4f}",
    ]


def snippet(out: str | os.PathLike) -> str:
    """The Python lines to paste into a BoxMOT program to track with the exported model."""
    return (
        "from pathlib import Path\n"
        "import torch\n"
        "from boxmot import BotSort  # or StrongSort, DeepOcSort, HybridSort, BoostTrack\n"
        f"tracker = BotSort(reid_weights=Path({os.fspath(Path(out).resolve())!r}), "
        "device=torch.device('cpu'), half=False)\n"
        "tracks = tracker.update(dets, frame)  # dets: N x 6 (x1, y1, x2, y2, conf, cls), frame: BGR"
    )


def print_summary(path: str | os.PathLike) -> None:
    """What `strongreid export --target boxmot` prints after writing `path` and its sidecar."""
    # What was written, not the config: a foreign checkpoint may set its own size and statistics.
    sidecar_file = sidecar_path(path)
    written = json.loads(sidecar_file.read_text(encoding="utf-8"))
    mean, std = written["pixel_mean_folded"], written["pixel_std_folded"]
    imagenet = mean == list(BOXMOT_PIXEL_MEAN) and std == list(BOXMOT_PIXEL_STD)
    print(f"boxmot metadata: {sidecar_file} (img_size {written['model_kwargs']['img_size']})")
    print("input normalisation: " + (
        "ImageNet mean/std, as BoxMOT feeds it" if imagenet else
        f"INPUT.PIXEL_MEAN {mean} / PIXEL_STD {std} folded into the graph (BoxMOT feeds "
        "ImageNet mean/std)"))
    print("use it in BoxMOT (pip install 'strongreid[tracking]'):")
    print(snippet(path))
