"""`strongreid export`: the inference model as ONNX, TorchScript or safetensors, checked for parity.

The exported model is the test-time feature function of `FeatureExtractor` on a preprocessed
batch (N x 3 x H x W, normalised with INPUT.PIXEL_MEAN/STD at INPUT.SIZE_TEST): the model's eval
forward (TEST.NECK_FEAT), the flip and TEST.MULTI_SCALE views when they are on, and L2
normalisation inside the graph when TEST.FEAT_NORM is 'yes'. Resizing and normalising the pixels
stay outside, and what they must be (size, resize filter, mean/std) is stored in the file's
metadata: features match only when the crops are resized as the model was tested. The classifier is not part of the ONNX
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
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from yacs.config import CfgNode

from strongreid.config import flag
from strongreid.config.loader import dump_config, with_overrides
from strongreid.deploy import boxmot
from strongreid.deploy.runtimes import require, run_onnx, run_openvino, to_openvino
from strongreid.engine.inference import test_feature, test_scales
from strongreid.errors import ConfigError, StrongReIDError
from strongreid.modeling.checkpoint import save_safetensors
from strongreid.modeling.loading import load_inference_model
from strongreid.paths import atomic_path, check_output_path
from strongreid.registry import Registry

logger = logging.getLogger("strongreid")

# --format name -> a class with `suffixes` (the --out suffixes that pick it when --format is not
# given) and `write(job: ExportJob)`, which writes the file and returns a function running the
# written file (batch -> features), for the parity check. Optional `check_available()` raises
# the install hint before any work.
EXPORT_FORMATS: Registry = Registry("export format")
# Formats `strongreid export` writes through deploy/quantize.py (checked by cosine, not 1e-4).
QUANTIZED_FORMATS = ("onnx-int8",)
PARITY_TOLERANCE = 1e-4
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "features"
# Batch sizes of the parity check: 1 and 3 differ from the batch of 2 used to trace, so a batch
# size frozen into the graph by mistake shows up as a failure.
CHECK_BATCHES = (1, 3)


class InferenceModel(nn.Module):
    """Preprocessed images -> test features, as `FeatureExtractor.features` computes them in fp32
    (the same `tta_forward`: flip and TEST.MULTI_SCALE views, PCB's per-stripe merge)."""

    def __init__(self, model: nn.Module, flip: bool, feat_norm: bool,
                 scales: tuple[float, ...] = (1.0,)) -> None:
        super().__init__()
        self.model = model.eval()
        self.flip = bool(flip)
        self.feat_norm = bool(feat_norm)
        self.scales = tuple(float(s) for s in scales)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return test_feature(self.model, images, self.flip, self.scales, self.feat_norm)


def build_inference_model(cfg: CfgNode, weights: str | os.PathLike) -> tuple[InferenceModel, CfgNode]:
    """The fp32 CPU inference model of a checkpoint, as the config's TEST keys define it, and the
    config it was built with (a foreign checkpoint sets its input size and pixel statistics)."""
    loaded = load_inference_model(cfg, weights)
    cfg = loaded.cfg
    model = InferenceModel(loaded.model, bool(cfg.TEST.FLIP_AUG), flag(cfg.TEST.FEAT_NORM), test_scales(cfg))
    return model.eval(), cfg


def export_metadata(cfg: CfgNode, model: InferenceModel) -> dict[str, str]:
    """What a consumer of the file needs to prepare inputs and interpret outputs (all strings)."""
    height, width = (int(v) for v in cfg.INPUT.SIZE_TEST)
    return {
        "format": "strongreid-inference",
        "arch": str(cfg.MODEL.NAME),
        "num_classes": str(int(model.model.num_classes)),
        "feat_dim": str(int(model.model.feat_dim)),
        "input": f"RGB float32 N x 3 x {height} x {width}: {resize_description(cfg)}, then "
                 f"(pixel / 255 - mean) / std",
        "input_size": json.dumps([height, width]),
        "interpolation": str(cfg.INPUT.INTERPOLATION),
        "pixel_mean": json.dumps([float(v) for v in cfg.INPUT.PIXEL_MEAN]),
        "pixel_std": json.dumps([float(v) for v in cfg.INPUT.PIXEL_STD]),
        "neck_feat": str(cfg.TEST.NECK_FEAT),
        "feat_norm": "yes" if model.feat_norm else "no",
        "flip_aug": "yes" if model.flip else "no",
        "multi_scale": json.dumps(list(model.scales)),
        "views": views_description(model.flip, model.scales),
        "config": dump_config(cfg),
        **camera_metadata(model.model),
    }


def camera_metadata(net: nn.Module) -> dict[str, str]:
    """For a model that embeds the camera (TransReID's SIE): the camera the graph assumes, since
    its input is the image alone. Empty for every other model."""
    if not getattr(net, "takes_camids", False):
        return {}
    return {"camera": f"{net.test_camera} (MODEL.TRANSREID.TEST_CAMERA): every image is embedded as "
                      "seen by this camera; set the key to export for another"}


def resize_description(cfg: CfgNode) -> str:
    """How the crops must be resized, in words: the filter the model was tested with."""
    height, width = (int(v) for v in cfg.INPUT.SIZE_TEST)
    return (f"the whole crop resized to {height} x {width} with {cfg.INPUT.INTERPOLATION} "
            "interpolation (PIL, antialiased when shrinking: torchvision's Resize on a PIL image)")


def views_description(flip: bool, scales: tuple[float, ...]) -> str:
    """What the graph averages over, in words: the views it computes from each input."""
    views = ["the image"] + (["its horizontal mirror"] if flip else [])
    extra = [s for s in scales if s != 1]
    text = " and ".join(views)
    if extra:
        text += f", each also resized by sqrt(s) per side for s in {extra} (bicubic, in the graph)"
    return "the graph averages " + text if (flip or extra) else "one view: the image as given"


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


def write_onnx(model: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str]) -> None:
    """`model` as a checked ONNX file at `out`, batch size dynamic, `meta` in its metadata."""
    import onnx

    # The exporter is chosen explicitly: torch's TorchScript-based one (dynamo=False), whatever
    # is installed. Leaving the choice to torch picks the torch.export-based exporter as soon as
    # onnxscript is importable (BoxMOT's [onnx] extra pulls it in), which writes another graph,
    # raises opset 17 to 18 and logs a traceback; the same command must give the same file.
    try:
        with _quiet_export():
            torch.onnx.export(
                model, (example,), str(out), dynamo=False, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], opset_version=ONNX_OPSET,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    except OSError:  # the file, not the exporter (export_model names --out): no other format helps
        raise
    except Exception as exc:  # noqa: BLE001 - any exporter failure becomes one message
        raise StrongReIDError(
            f"torch.onnx.export (TorchScript exporter, opset {ONNX_OPSET}) failed for {out}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
            "try --format torchscript"
        ) from None
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))


def _export_torchscript(model: nn.Module, example: torch.Tensor, out: Path,
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
    # clone(): safetensors refuses tensors that share memory, and views must be contiguous.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.model.state_dict().items()}
    save_safetensors(state, out, meta)


def _run_safetensors(cfg: CfgNode, out: Path) -> Callable[[torch.Tensor], np.ndarray]:
    rebuilt, _ = build_inference_model(cfg, out)

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return rebuilt(x).numpy()

    return run


@dataclass
class ExportJob:
    """What a format writes: `graph` (the module to serialise: the inference model, or BoxMOT's
    wrapper of it) traced on `example`, to `out` with `meta`; `model` is the inference model and
    `cfg` the config it was built with."""

    graph: nn.Module
    example: torch.Tensor
    out: Path
    meta: dict[str, str]
    model: InferenceModel
    cfg: CfgNode


def _onnx_available() -> None:
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        raise StrongReIDError(
            "ONNX export needs the onnx and onnxruntime packages: pip install 'strongreid[deploy]'"
        )


@EXPORT_FORMATS.register("onnx")
class OnnxFormat:
    """ONNX (opset ONNX_OPSET, dynamic batch), run back with onnxruntime."""

    suffixes = (".onnx",)
    check_available = staticmethod(_onnx_available)
    single_file = True  # written under a temporary name, then renamed (see export_model)

    def write(self, job: ExportJob) -> Callable[[torch.Tensor], np.ndarray]:
        write_onnx(job.graph, job.example, job.out, job.meta)
        return run_onnx(job.out)


@EXPORT_FORMATS.register("torchscript")
class TorchScriptFormat:
    """A traced TorchScript module with the metadata as an extra file."""

    suffixes = (".torchscript", ".ts")
    single_file = True

    def write(self, job: ExportJob) -> Callable[[torch.Tensor], np.ndarray]:
        _export_torchscript(job.graph, job.example, job.out, job.meta)
        return _run_torchscript(job.out)


@EXPORT_FORMATS.register("safetensors")
class SafetensorsFormat:
    """The full state dict (classifier included) that `FeatureExtractor` and `test` load."""

    suffixes = (".safetensors",)

    def write(self, job: ExportJob) -> Callable[[torch.Tensor], np.ndarray]:
        _export_safetensors(job.model, job.out, job.meta)
        return _run_safetensors(job.cfg, job.out)


@EXPORT_FORMATS.register("openvino")
class OpenVinoFormat:
    """OpenVINO IR (NAME.xml + NAME.bin, fp32 weights) converted from the ONNX graph."""

    suffixes = (".xml",)
    check_available = staticmethod(_onnx_available)

    def write(self, job: ExportJob) -> Callable[[torch.Tensor], np.ndarray]:
        require("openvino", "quant")
        if job.out.suffix != ".xml":
            raise ConfigError(f"--out {job.out}: an OpenVINO IR is NAME.xml (its weights go to NAME.bin)")
        with tempfile.TemporaryDirectory(dir=job.out.parent) as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            write_onnx(job.graph, job.example, fp32, job.meta)
            to_openvino(fp32, job.out, job.meta)
        return run_openvino(job.out)


def format_for_suffix(out: str | os.PathLike) -> str | None:
    """The registered format whose suffix `out` has (case-insensitive), if any."""
    suffix = Path(out).suffix.lower()
    return next((name for name in EXPORT_FORMATS.names_in_order()
                 if suffix in EXPORT_FORMATS.get(name).suffixes), None)


TARGETS = ("strongreid", "boxmot")


class Exported(NamedTuple):
    """A written file, its largest difference from PyTorch on the check batches, and the
    architecture it holds (the checkpoint's, which may not be the config's MODEL.NAME)."""

    path: Path
    difference: float
    arch: str


def export_model(cfg: CfgNode, fmt: str | None, out: str | os.PathLike,
                 weights: str | os.PathLike | None = None,
                 target: str = "strongreid") -> Exported:
    """Export the inference model of `weights` (default TEST.WEIGHT) and check it.

    `fmt` names a registered format (EXPORT_FORMATS); None takes it from the suffix of `out`.
    `target` 'boxmot' writes the graph BoxMOT feeds (ImageNet-normalised RGB crops: the
    difference from INPUT.PIXEL_MEAN/STD is part of the graph) and its `<out>.metadata.json`.
    Returns the file, the largest absolute difference from PyTorch on the check batches and the
    architecture; raises StrongReIDError when that exceeds PARITY_TOLERANCE (the file is kept for inspection).
    """
    if target not in TARGETS:
        raise ConfigError(f"--target {target!r}: use one of {', '.join(TARGETS)}")
    if target == "boxmot":
        fmt = boxmot.boxmot_format(out, fmt)
    elif fmt is None:
        fmt = format_for_suffix(out)
        if fmt is None:
            suffixes = [s for n in EXPORT_FORMATS.names_in_order() for s in EXPORT_FORMATS.get(n).suffixes]
            raise ConfigError(f"--out {out}: give --format ({', '.join(EXPORT_FORMATS.names_in_order())}) "
                              f"or a file ending in {', '.join(suffixes[:-1])} or {suffixes[-1]}")
    if fmt in QUANTIZED_FORMATS:
        raise ConfigError(f"--format {fmt}: int8 models are written by "
                          "strongreid.deploy.quantize.export_int8 (it needs calibration images)")
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of "
                          f"{', '.join(EXPORT_FORMATS.names_in_order() + list(QUANTIZED_FORMATS))}")
    writer = EXPORT_FORMATS.get(fmt)()
    weights = weights or cfg.TEST.WEIGHT
    if not weights:
        raise ConfigError("strongreid export needs TEST.WEIGHT: the checkpoint, e.g. "
                          "TEST.WEIGHT runs/demo/best.pt")
    if hasattr(writer, "check_available"):
        writer.check_available()
    # Before the model is built and traced: a path that cannot be written costs nothing.
    out = check_output_path(out, "--out")
    model, cfg = build_inference_model(cfg, weights)
    if cfg.MODEL.CHECKPOINT_FORMAT != "auto":
        # The exported file is strongreid's own, whatever project wrote the checkpoint (layumi,
        # fast-reid...): its stored config must not send the reader to that format's converter.
        cfg = with_overrides(cfg, {"MODEL.CHECKPOINT_FORMAT": "auto"}, "for the exported file")
    meta = export_metadata(cfg, model)
    if "camera" in meta:
        logger.warning("the exported graph takes images without camera ids: SIE camera %s", meta["camera"])
    graph: nn.Module = model
    if target == "boxmot":
        # From the config the model was built with: a foreign checkpoint brings its own statistics.
        graph = boxmot.BoxMOTModel(model, boxmot.input_adapter(cfg)).eval()
        meta["target"] = "boxmot"
        meta["input"] = (f"RGB float32 N x 3 x {meta['input_size']}, (pixel / 255 - imagenet_mean)"
                         " / imagenet_std (BoxMOT's preprocessing); INPUT.PIXEL_MEAN/STD are "
                         "applied inside the graph")
    example = sample_inputs(cfg, (2,), seed=1)[0]
    # A one-file format writes to a temporary name first: a failed export leaves an earlier file
    # at --out as it was, and no partial file behind (.safetensors is written atomically too).
    single = getattr(writer, "single_file", False)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out, keep_suffix=True) if single else contextlib.nullcontext(out) as dest:
            runner = writer.write(ExportJob(graph, example, dest, meta, model, cfg))
    except OSError as exc:
        raise StrongReIDError(f"--out {out}: cannot write the {fmt} file ({exc.strerror or exc}); "
                              "check the path, its permissions and the free space") from None

    def reference(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return graph(x).numpy()

    diff = max_abs_diff(reference, runner, sample_inputs(cfg))
    if not diff <= PARITY_TOLERANCE:  # `not <=` so that a NaN difference fails too
        raise StrongReIDError(
            f"the {fmt} export {out} differs from PyTorch by up to {diff:.3g} (tolerance "
            f"{PARITY_TOLERANCE:g}); the file is kept for inspection but should not be used"
        )
    if target == "boxmot":
        boxmot.write_sidecar(out, cfg)
    return Exported(out, diff, meta["arch"])


def boxmot_preprocessing_check(cfg: CfgNode) -> tuple[dict[str, Any] | None, str]:
    """`deploy.boxmot.preprocessing_check` for TEST.WEIGHT with the fp32 PyTorch model and its
    BoxMOT graph (the exported file matches it to PARITY_TOLERANCE); (None, why) when the test
    split or OpenCV is not available."""
    model, built = build_inference_model(cfg, cfg.TEST.WEIGHT)
    graph = boxmot.BoxMOTModel(model, boxmot.input_adapter(built)).eval()
    try:
        return boxmot.preprocessing_check(built, model, graph), ""
    except StrongReIDError as exc:
        return None, str(exc)


def export_command(cfg: CfgNode, fmt: str | None, out: str, target: str = "strongreid",
                   check_preprocessing: bool = True) -> int:
    """`strongreid export --config F TEST.WEIGHT ckpt [--format F] [--target boxmot] --out FILE`.

    With `--target boxmot` (unless `check_preprocessing` is off) the model is also evaluated on
    the config's test split under BoxMOT's crop preparation, and what that costs is printed and
    stored in the sidecar."""
    path, diff, arch = export_model(cfg, fmt, out, target=target)
    fmt = fmt or format_for_suffix(path) or "torchscript"
    batches = " and ".join(str(n) for n in CHECK_BATCHES)
    print(f"exported {arch} ({fmt}) to {path}")
    print(f"parity: max |{fmt} - pytorch| = {diff:.3g} on batches of {batches} "
          f"(tolerance {PARITY_TOLERANCE:g})")
    if target == "boxmot":
        if check_preprocessing:
            check, why = boxmot_preprocessing_check(cfg)
            if check is not None:
                _, built = build_inference_model(cfg, cfg.TEST.WEIGHT)
                boxmot.write_sidecar(path, built, check)
                for line in boxmot.describe_check(check):
                    print(line)
            else:
                print(f"preprocessing: BoxMOT resizes crops with {boxmot.BOXMOT_RESIZE}; its cost "
                      f"was not measured ({why}); set DATASETS.NAMES / DATASETS.ROOT_DIR to a test "
                      "split to measure it")
        boxmot.print_summary(path)
    return 0
