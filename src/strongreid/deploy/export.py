"""`strongreid export`: the inference model as ONNX, TorchScript or safetensors, checked for parity.

The exported model is the test-time feature function of `FeatureExtractor` on a preprocessed
batch (N x 3 x H x W, normalised with INPUT.PIXEL_MEAN/STD at INPUT.SIZE_TEST): the model's eval
forward (TEST.NECK_FEAT), the flip mean when TEST.FLIP_AUG is on, and L2 normalisation inside
the graph when TEST.FEAT_NORM is 'yes'. Resizing and normalising the pixels stay outside, and the
values needed for them are stored in the file's metadata. The classifier is not part of the ONNX
or TorchScript graph. The .safetensors file holds the model's full state dict (classifier
included) with the architecture, class count and config as metadata, so `FeatureExtractor`
and `strongreid test` load it like a checkpoint.

After writing, the file is loaded back and run (onnxruntime, torch.jit.load or a model rebuilt
from the safetensors file) on random batches of two sizes; the largest absolute difference from
the PyTorch model is printed, and above PARITY_TOLERANCE the export fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode

from strongreid.errors import ConfigError, StrongReIDError

logger = logging.getLogger("strongreid")

FORMATS = ("onnx", "torchscript", "safetensors")
PARITY_TOLERANCE = 1e-4
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "features"
# Batch sizes of the parity check: 1 and 3 differ from the batch of 2 used to trace, so a batch
# size frozen into the graph by mistake shows up as a failure.
CHECK_BATCHES = (1, 3)


class InferenceModel(nn.Module):
    """Preprocessed images -> test features, as `FeatureExtractor.features` computes them in fp32."""

    def __init__(self, model: nn.Module, flip: bool, feat_norm: bool) -> None:
        super().__init__()
        self.model = model.eval()
        self.flip = bool(flip)
        self.feat_norm = bool(feat_norm)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.model(images)
        if self.flip:
            f = (f + self.model(torch.flip(images, dims=[3]))) / 2
        if self.feat_norm:
            f = F.normalize(f, p=2, dim=1, eps=1e-12)
        return f


def build_inference_model(cfg: CfgNode, weights: str | os.PathLike) -> tuple[InferenceModel, CfgNode]:
    """The fp32 CPU inference model of a checkpoint, as the config's TEST keys define it, and the
    config it was built with (a foreign checkpoint sets its input size and pixel statistics)."""
    from strongreid.config import flag
    from strongreid.modeling.loading import load_inference_model

    model, cfg, _ = load_inference_model(cfg, weights)
    return InferenceModel(model, bool(cfg.TEST.FLIP_AUG), flag(cfg.TEST.FEAT_NORM)).eval(), cfg


def export_metadata(cfg: CfgNode, model: InferenceModel) -> dict[str, str]:
    """What a consumer of the file needs to prepare inputs and interpret outputs (all strings)."""
    from strongreid.config.loader import dump_config

    height, width = (int(v) for v in cfg.INPUT.SIZE_TEST)
    return {
        "format": "strongreid-inference",
        "arch": str(cfg.MODEL.NAME),
        "num_classes": str(int(model.model.num_classes)),
        "feat_dim": str(int(model.model.feat_dim)),
        "input": f"RGB float32 N x 3 x {height} x {width}, (pixel / 255 - mean) / std",
        "input_size": json.dumps([height, width]),
        "pixel_mean": json.dumps([float(v) for v in cfg.INPUT.PIXEL_MEAN]),
        "pixel_std": json.dumps([float(v) for v in cfg.INPUT.PIXEL_STD]),
        "neck_feat": str(cfg.TEST.NECK_FEAT),
        "feat_norm": "yes" if model.feat_norm else "no",
        "flip_aug": "yes" if model.flip else "no",
        "config": dump_config(cfg),
    }


def sample_inputs(cfg: CfgNode, batches: tuple[int, ...] = CHECK_BATCHES, seed: int = 0) -> list[torch.Tensor]:
    """Seeded normal batches shaped like preprocessed images (normalised pixels are ~N(0, 1))."""
    height, width = (int(v) for v in cfg.INPUT.SIZE_TEST)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, height, width, generator=gen) for n in batches]


def max_abs_diff(reference: Callable[[torch.Tensor], Any], candidate: Callable[[torch.Tensor], Any],
                 inputs: list[torch.Tensor]) -> float:
    """The largest |candidate - reference| over all inputs (shapes must agree)."""
    worst = 0.0
    for x in inputs:
        ref = np.asarray(reference(x), dtype=np.float64)
        got = np.asarray(candidate(x), dtype=np.float64)
        if ref.shape != got.shape:
            raise StrongReIDError(
                f"the exported model returns shape {got.shape} for a batch of {x.shape[0]}, "
                f"PyTorch {ref.shape}"
            )
        worst = max(worst, float(np.max(np.abs(ref - got))) if ref.size else 0.0)
    return worst


@contextlib.contextmanager
def _quiet_export():
    # The exporters warn about their own deprecations and about tracing details that do not
    # apply to a fixed CNN graph; users of the command cannot act on them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _export_onnx(model: InferenceModel, example: torch.Tensor, out: Path, meta: dict[str, str]) -> None:
    import onnx

    with _quiet_export():
        if importlib.util.find_spec("onnxscript") is not None:
            # The torch.export-based exporter (PyTorch's default since 2.9) needs onnxscript.
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes={"images": {0: batch}}, opset_version=ONNX_OPSET, external_data=False,
            )
            program.save(str(out))
        else:
            torch.onnx.export(
                model, (example,), str(out), dynamo=False, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))


def _run_onnx(out: Path) -> Callable[[torch.Tensor], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def _export_torchscript(model: InferenceModel, example: torch.Tensor, out: Path,
                        meta: dict[str, str]) -> None:
    with _quiet_export(), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
        traced.save(str(out), _extra_files={"strongreid.json": json.dumps(meta)})


def _run_torchscript(out: Path) -> Callable[[torch.Tensor], np.ndarray]:
    with _quiet_export():
        loaded = torch.jit.load(str(out), map_location="cpu")
    loaded.eval()

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return loaded(x).numpy()

    return run


def _export_safetensors(model: InferenceModel, out: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # clone(): save_file refuses tensors that share memory, and views must be contiguous.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.model.state_dict().items()}
    save_file(state, str(out), metadata=meta)


def _run_safetensors(cfg: CfgNode, out: Path) -> Callable[[torch.Tensor], np.ndarray]:
    rebuilt, _ = build_inference_model(cfg, out)

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return rebuilt(x).numpy()

    return run


def export_model(cfg: CfgNode, fmt: str, out: str | os.PathLike,
                 weights: str | os.PathLike | None = None) -> tuple[Path, float]:
    """Export the inference model of `weights` (default TEST.WEIGHT) and check it.

    Returns the file and the largest absolute difference from PyTorch on the check batches;
    raises StrongReIDError when that exceeds PARITY_TOLERANCE (the file is kept for inspection).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    weights = weights or cfg.TEST.WEIGHT
    if not weights:
        raise ConfigError("strongreid export needs TEST.WEIGHT: the checkpoint, e.g. "
                          "TEST.WEIGHT runs/demo/best.pt")
    if fmt == "onnx" and (importlib.util.find_spec("onnx") is None
                          or importlib.util.find_spec("onnxruntime") is None):
        raise StrongReIDError(
            "ONNX export needs the onnx and onnxruntime packages: pip install 'strongreid[deploy]'"
        )
    model, cfg = build_inference_model(cfg, weights)
    meta = export_metadata(cfg, model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = sample_inputs(cfg, (2,), seed=1)[0]
    if fmt == "onnx":
        _export_onnx(model, example, out, meta)
        runner = _run_onnx(out)
    elif fmt == "torchscript":
        _export_torchscript(model, example, out, meta)
        runner = _run_torchscript(out)
    else:
        _export_safetensors(model, out, meta)
        runner = _run_safetensors(cfg, out)

    def reference(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(x).numpy()

    diff = max_abs_diff(reference, runner, sample_inputs(cfg))
    if not diff <= PARITY_TOLERANCE:  # `not <=` so that a NaN difference fails too
        raise StrongReIDError(
            f"the {fmt} export {out} differs from PyTorch by up to {diff:.3g} (tolerance "
            f"{PARITY_TOLERANCE:g}); the file is kept for inspection but should not be used"
        )
    return out, diff


def export_command(cfg: CfgNode, fmt: str, out: str) -> int:
    """`strongreid export --config F TEST.WEIGHT ckpt --format onnx|torchscript|safetensors --out FILE`."""
    path, diff = export_model(cfg, fmt, out)
    batches = " and ".join(str(n) for n in CHECK_BATCHES)
    print(f"exported {cfg.MODEL.NAME} ({fmt}) to {path}")
    print(f"parity: max |{fmt} - pytorch| = {diff:.3g} on batches of {batches} "
          f"(tolerance {PARITY_TOLERANCE:g})")
    return 0

