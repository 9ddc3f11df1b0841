"""Faster CPU inference: ONNX Runtime int8 static quantisation and OpenVINO IR, with parity reports.

Both start from the fp32 ONNX graph `strongreid export` writes (same input, same output):

* `onnx-int8`: onnxruntime's static quantisation (QDQ, per-channel int8 weights, uint8
  activations, MinMax ranges) calibrated on real images run through the test transform. Only
  Conv / MatMul / Gemm are quantised: the BN neck and the in-graph L2 normalisation stay fp32,
  because quantising a unit vector's division costs accuracy and no time.
* `openvino`: the ONNX graph converted with `openvino.convert_model` and saved as IR
  (NAME.xml + NAME.bin, fp32 weights); it is checked at f32 inference precision, so it must match
  PyTorch within export's PARITY_TOLERANCE like the other fp32 formats.

An int8 model cannot match fp32 to 1e-4, so its check is the cosine between its features and
the fp32 model's on the calibration images: below INT8_MIN_COSINE (mean) the export fails.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from yacs.config import CfgNode

from strongreid.deploy import boxmot
from strongreid.deploy.export import export_model
from strongreid.deploy.runtimes import load_onnxruntime, require, run_onnx
from strongreid.errors import ConfigError, StrongReIDError
from strongreid.paths import check_output_path

# Calibration: at most this many images (the first ones of the sorted list), in batches of 32.
CALIB_MAX_IMAGES = 256
CALIB_BATCH = 32
INT8_MIN_COSINE = 0.95
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm"]


def calibration_batches(cfg: CfgNode, images: str | os.PathLike | None) -> list[np.ndarray]:
    """Preprocessed calibration batches (N x 3 x H x W float32) from a folder or list of images."""
    from strongreid.data import build_transforms, read_image
    from strongreid.deploy.extractor import list_images

    if not images:
        raise ConfigError("--format onnx-int8 needs calibration images: --calib FOLDER (or a list "
                          "file), e.g. the training images of the data set the model will see")
    paths = list_images(images, "--calib")[:CALIB_MAX_IMAGES]
    transform = build_transforms(cfg, is_train=False)
    tensors = torch.stack([transform(read_image(p)) for p in paths])
    return [tensors[i:i + CALIB_BATCH].numpy() for i in range(0, len(tensors), CALIB_BATCH)]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over fixed batches."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.name, self.batches = name, batches
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.name: batch}

    def rewind(self) -> None:
        self._it = iter(self.batches)


def quantize_int8(fp32_onnx: Path, out: Path, batches: list[np.ndarray]) -> None:
    """Static int8 quantisation of an fp32 ONNX file, calibrated on `batches`; metadata kept."""
    import onnx

    load_onnxruntime()  # started with its telemetry off before its quantization tools load it
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = onnx.load(str(fp32_onnx))
    meta = {p.key: p.value for p in source.metadata_props}
    input_name = source.graph.input[0].name
    # onnxruntime prints its progress ("Performing symbolic shape inference...") to stdout.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, contextlib.redirect_stdout(io.StringIO()):
        # The recommended pre-pass: shape inference and graph optimisation (BN folded into Conv).
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared))
        quantize_static(
            str(prepared), str(out), _Reader(input_name, batches), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    proto = onnx.load(str(out))
    del proto.metadata_props[:]
    meta["quantization"] = (f"onnxruntime static int8 (QDQ, per-channel weights, MinMax on "
                            f"{sum(len(b) for b in batches)} images, ops {','.join(QUANTIZED_OPS)})")
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two N x D arrays (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(den, 1e-12)


def int8_parity(reference: Callable[[np.ndarray], np.ndarray], candidate: Callable[[np.ndarray], np.ndarray],
                batches: list[np.ndarray]) -> dict[str, float]:
    """Mean and minimum cosine of int8 to fp32 features, and the largest absolute difference."""
    ref = np.concatenate([reference(b) for b in batches])
    got = np.concatenate([candidate(b) for b in batches])
    cos = cosine_rows(ref, got)
    return {"images": int(len(cos)), "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "max_abs_diff": float(np.abs(ref - got).max())}


def _exported_config(onnx_path: Path) -> CfgNode:
    """The merged config `strongreid export` stored in an ONNX file's metadata (a clone)."""
    import onnx

    from strongreid.config.loader import config_from_text

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    return config_from_text(meta["config"]).clone()


def export_int8(cfg: CfgNode, out: str | os.PathLike, calib: str | os.PathLike | None,
                weights: str | os.PathLike | None = None, target: str = "strongreid") -> tuple[Path, dict]:
    """Write the int8 ONNX model of `weights` (default TEST.WEIGHT); returns it and its parity report.

    Raises StrongReIDError when the mean cosine to fp32 on the calibration images is below
    INT8_MIN_COSINE (the file is kept for inspection).
    """
    require("onnxruntime", "deploy")
    if not calib:
        calibration_batches(cfg, calib)  # raises the message naming --calib before any work
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_model(cfg, "onnx", fp32, weights=weights, target=target)
        # Calibrate with the config the model was built with (a foreign checkpoint sets its own
        # input size and statistics); export stored it in the file.
        calib_cfg = _exported_config(fp32)
        if target == "boxmot":
            # The BoxMOT graph takes ImageNet-normalised crops: calibrate on such input.
            calib_cfg.defrost()
            calib_cfg.INPUT.PIXEL_MEAN = list(boxmot.BOXMOT_PIXEL_MEAN)
            calib_cfg.INPUT.PIXEL_STD = list(boxmot.BOXMOT_PIXEL_STD)
            calib_cfg.freeze()
        batches = calibration_batches(calib_cfg, calib)
        quantize_int8(fp32, out, batches)
        report = int8_parity(run_onnx(fp32), run_onnx(out), batches)
    if target == "boxmot":
        boxmot.write_sidecar(out, _exported_config(out))
    if not report["mean_cosine"] >= INT8_MIN_COSINE:
        raise StrongReIDError(
            f"the int8 model {out} has a mean cosine of {report['mean_cosine']:.4f} to the fp32 "
            f"features on {report['images']} calibration images (at least {INT8_MIN_COSINE} "
            "needed); calibrate on more representative images or keep the fp32 export"
        )
    return out, report


def export_int8_command(cfg: CfgNode, out: str, calib: str | None, target: str = "strongreid") -> int:
    """`strongreid export --format onnx-int8 --calib IMAGES --out FILE [--target boxmot]`."""
    if target == "boxmot":
        boxmot.boxmot_format(out, "onnx-int8")
    check_output_path(out, "--out")  # before the model is built and calibrated
    path, report = export_int8(cfg, out, calib, target=target)
    print(f"exported {cfg.MODEL.NAME} (onnx-int8) to {path}")
    print(f"parity: cosine to fp32 features on {report['images']} calibration images: mean "
          f"{report['mean_cosine']:.5f}, min {report['min_cosine']:.5f} (max |int8 - fp32| = "
          f"{report['max_abs_diff']:.3g})")
    if target == "boxmot":
        boxmot.print_summary(path)
    return 0
