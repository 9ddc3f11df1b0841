"""The runtimes exported files run on (onnxruntime, OpenVINO) and the optional-package check.

Shared by `export` (parity of every written file) and `quantize` (int8 calibration and parity).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strongreid.errors import StrongReIDError


def require(module: str, extra: str) -> None:
    """Raise a one-line install hint when an optional package is missing."""
    if importlib.util.find_spec(module) is None:
        raise StrongReIDError(f"this export needs the {module} package: pip install 'strongreid[{extra}]'")


def load_onnxruntime() -> Any:
    """onnxruntime, imported with its usage telemetry off.

    Since 1.29 onnxruntime's Linux and macOS builds queue usage events (machine, OS, Python
    path, models run) for upload to Microsoft, with a persistent device id on disk. A toolkit
    that serves pictures of people sends nothing anywhere: ORT_TELEMETRY_DISABLED=1 is the full
    opt-out when set before onnxruntime starts. A value the user set is left as it is.
    """
    os.environ.setdefault("ORT_TELEMETRY_DISABLED", "1")
    import onnxruntime as ort

    if os.environ["ORT_TELEMETRY_DISABLED"] == "1":
        ort.disable_telemetry_events()
    return ort


def run_onnx(out: Path, threads: int | None = None, spin: bool = True) -> Callable[[torch.Tensor], np.ndarray]:
    """Features from an ONNX file with onnxruntime on the CPU. `spin` False: its threads sleep
    between runs instead of spinning, for a process whose other threads need the same cores."""
    ort = load_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.asarray(x, dtype=np.float32)})[0]


def to_openvino(fp32_onnx: Path, out: Path, meta: dict[str, str]) -> None:
    """Convert an fp32 ONNX file to OpenVINO IR at `out` (.xml, with its .bin), fp32 weights."""
    import openvino as ov

    model = ov.convert_model(str(fp32_onnx))
    for key, value in meta.items():
        model.set_rt_info(value, ["strongreid", key])
    ov.save_model(model, str(out), compress_to_fp16=False)


def run_openvino(xml: Path, threads: int | None = None) -> Callable[[torch.Tensor | np.ndarray], np.ndarray]:
    """Features from an OpenVINO IR on the CPU at f32 precision (no silent bf16 on new CPUs)."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = ov.Core().compile_model(str(xml), "CPU", config)
    output = compiled.output(0)

    def run(x: Any) -> np.ndarray:
        arr = x.numpy() if isinstance(x, torch.Tensor) else x
        return np.asarray(compiled(arr)[output])

    return run
