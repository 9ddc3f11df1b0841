"""`strongreid export --format onnx-int8 | openvino`: calibration, parity and the refusals."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from test_deploy import OPTS, make_cfg, save_ckpt

from strongreid import FeatureExtractor
from strongreid.cli import main
from strongreid.deploy.export import PARITY_TOLERANCE, export_model
from strongreid.deploy.extractor import list_images
from strongreid.deploy.quantize import cosine_rows, int8_parity
from strongreid.errors import ConfigError

needs_ort = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="the deploy extra (onnx, onnxruntime) is not installed: pip install '.[deploy]'",
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_ckpt(tmp_path_factory.mktemp("quant") / "model.pt", make_cfg())


def _opts(ckpt, **extra) -> list[str]:
    opts = {**OPTS, **extra, "TEST.WEIGHT": str(ckpt)}
    return [x for kv in opts.items() for x in kv]


def test_cosine_rows_by_hand() -> None:
    a = np.array([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [6.0, 8.0], [-1.0, -1.0]])
    assert cosine_rows(a, b).tolist() == pytest.approx([0.0, 1.0, -1.0], abs=1e-12)
    report = int8_parity(lambda x: x, lambda x: x * np.array([1.0, 0.5]), [a[:2]])
    # row 0: identical direction (1, 0); row 1: (3, 2) vs (3, 4): cos = 17 / (sqrt(13) * 5)
    assert report["min_cosine"] == pytest.approx(17 / (13 ** 0.5 * 5), abs=1e-12)
    assert report["max_abs_diff"] == 2.0 and report["images"] == 2


@needs_ort
def test_int8_export_is_quantised_and_close_to_fp32(ckpt, tiny_synthetic_root, tmp_path, capsys) -> None:
    import onnx
    import onnxruntime as ort

    train = tiny_synthetic_root / "synthetic" / "bounding_box_train"
    out = tmp_path / "model_int8.onnx"
    assert main(["export", "--format", "onnx-int8", "--calib", str(train), "--out", str(out),
                 *_opts(ckpt)]) == 0
    printed = capsys.readouterr().out
    assert f"cosine to fp32 features on {len(list_images(train))} calibration images" in printed
    proto = onnx.load(str(out))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(init.data_type == onnx.TensorProto.INT8 for init in proto.graph.initializer)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["arch"] == "resnet18" and "int8" in meta["quantization"]
    # Held-out images (the query split): int8 features point where the fp32 ones do.
    fe = FeatureExtractor(config=make_cfg(**{"TEST.WEIGHT": ckpt}), weights=ckpt)
    x = fe.preprocess(sorted((tiny_synthetic_root / "synthetic" / "query").glob("*.jpg")))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert cosine_rows(fe(x).numpy(), got).mean() > 0.95


@needs_ort
def test_int8_refusals(ckpt, tmp_path, capsys) -> None:
    assert main(["export", "--format", "onnx-int8", "--out", str(tmp_path / "m.onnx"), *_opts(ckpt)]) == 2
    assert "--calib FOLDER" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="export_int8"):
        export_model(make_cfg(**{"TEST.WEIGHT": ckpt}), "onnx-int8", tmp_path / "m.onnx")


@needs_ort
def test_int8_for_boxmot_writes_the_sidecar(ckpt, tiny_synthetic_root, tmp_path, capsys) -> None:
    out = tmp_path / "reid_int8.onnx"
    calib = tiny_synthetic_root / "synthetic" / "query"
    assert main(["export", "--target", "boxmot", "--format", "onnx-int8", "--calib", str(calib),
                 "--out", str(out), *_opts(ckpt)]) == 0
    assert "BotSort(reid_weights=" in capsys.readouterr().out
    sidecar = json.loads((tmp_path / "reid_int8.onnx.metadata.json").read_text())
    assert sidecar["model_kwargs"]["img_size"] == [32, 16]


@needs_ort
@pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                    reason="OpenVINO is not installed: pip install 'strongreid[quant]'")
def test_openvino_ir_matches_pytorch(ckpt, tmp_path) -> None:
    import openvino as ov

    cfg = make_cfg(**{"TEST.WEIGHT": ckpt, "TEST.FLIP_AUG": "True"})
    path, diff, _ = export_model(cfg, None, tmp_path / "model.xml")
    assert diff <= PARITY_TOLERANCE and (tmp_path / "model.bin").is_file()
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    fe = FeatureExtractor(config=cfg, weights=ckpt)
    x = torch.randn(5, 3, 32, 16, generator=torch.Generator().manual_seed(3))
    got = compiled(x.numpy())[compiled.output(0)]
    assert np.abs(got - fe(x).numpy()).max() <= PARITY_TOLERANCE
    with pytest.raises(ConfigError, match="NAME.xml"):
        export_model(cfg, "openvino", tmp_path / "model.ir")
