"""`strongreid export --target boxmot` without BoxMOT: the folded normalisation, the sidecar, the CLI.

BoxMOT itself is exercised in test_tracking.py (skipped where it is not installed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_deploy import make_cfg, save_ckpt

from strongreid.cli import main
from strongreid.deploy import boxmot
from strongreid.deploy.export import build_inference_model, export_model
from strongreid.errors import ConfigError

needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="the deploy extra (onnx, onnxruntime) is not installed: pip install '.[deploy]'",
)
OTHER_NORM = {"INPUT.PIXEL_MEAN": "[0.5, 0.5, 0.5]", "INPUT.PIXEL_STD": "[0.25, 0.25, 0.25]"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_ckpt(tmp_path_factory.mktemp("boxmot") / "model.pt", make_cfg())


def test_adapter_coefficients_by_hand() -> None:
    adapter = boxmot.input_adapter(make_cfg(**OTHER_NORM))
    # scale = s_imagenet / s = 0.229 / 0.25, ...; shift = (m_imagenet - m) / s = (0.485 - 0.5) / 0.25, ...
    assert adapter.scale.flatten().tolist() == pytest.approx([0.916, 0.896, 0.9], abs=1e-7)
    assert adapter.shift.flatten().tolist() == pytest.approx([-0.06, -0.176, -0.376], abs=1e-7)
    assert boxmot.input_adapter(make_cfg()) is None  # the defaults are ImageNet's: nothing to fold


def test_adapter_turns_boxmot_input_into_the_models() -> None:
    cfg = make_cfg(**{"INPUT.PIXEL_MEAN": "[0.3, 0.6, 0.1]", "INPUT.PIXEL_STD": "[0.2, 0.5, 0.3]"})
    pixels = torch.arange(256, dtype=torch.float32).repeat(3, 1).view(1, 3, 16, 16) / 255
    mi, si = (torch.tensor(v).view(1, 3, 1, 1) for v in (boxmot.BOXMOT_PIXEL_MEAN, boxmot.BOXMOT_PIXEL_STD))
    m, s = torch.tensor([0.3, 0.6, 0.1]).view(1, 3, 1, 1), torch.tensor([0.2, 0.5, 0.3]).view(1, 3, 1, 1)
    got = boxmot.input_adapter(cfg)((pixels - mi) / si)
    assert torch.allclose(got, (pixels - m) / s, atol=2e-6)


def test_refusals_name_the_fix(ckpt, tmp_path) -> None:
    cfg = make_cfg(**{"TEST.WEIGHT": ckpt})
    with pytest.raises(ConfigError, match=r"NAME\.onnx"):
        export_model(cfg, None, tmp_path / "model.pt", target="boxmot")
    with pytest.raises(ConfigError, match="use --format torchscript"):
        export_model(cfg, "onnx", tmp_path / "model.torchscript", target="boxmot")
    with pytest.raises(ConfigError, match="onnx, onnx-int8, torchscript or openvino"):
        export_model(cfg, "safetensors", tmp_path / "model.onnx", target="boxmot")
    with pytest.raises(ConfigError, match="--target"):
        export_model(cfg, "onnx", tmp_path / "model.onnx", target="deepsort")
    with pytest.raises(ConfigError, match="give --format"):
        export_model(cfg, None, tmp_path / "model.bin")


@needs_onnx
def test_cli_writes_onnx_sidecar_and_snippet(ckpt, tmp_path, capsys) -> None:
    import onnxruntime as ort

    out = tmp_path / "reid.onnx"
    assert main(["export", "--target", "boxmot", "--out", str(out), *_cli_opts(ckpt, OTHER_NORM)]) == 0
    printed = capsys.readouterr().out
    assert f"BotSort(reid_weights=Path({str(out.resolve())!r}), device=torch.device('cpu'), half=False)" in printed
    assert "folded into the graph" in printed
    sidecar = json.loads((tmp_path / "reid.onnx.metadata.json").read_text())
    assert sidecar["schema_version"] == 1 and sidecar["model_kwargs_schema_version"] == 1
    assert sidecar["model_kwargs"] == {"img_size": [32, 16]} and sidecar["preprocess"] == "resize"
    # The graph takes ImageNet-normalised crops and gives the model's features on its own input.
    x = torch.randn(3, 3, 32, 16, generator=torch.Generator().manual_seed(0))
    cfg = make_cfg(**OTHER_NORM, **{"TEST.WEIGHT": ckpt})
    model, _ = build_inference_model(cfg, ckpt)
    with torch.no_grad():
        want = model(boxmot.input_adapter(cfg)(x)).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-5


def _cli_opts(ckpt: Path, extra: dict[str, str]) -> list[str]:
    from test_deploy import OPTS

    opts = {**OPTS, **extra, "TEST.WEIGHT": str(ckpt)}
    return [x for kv in opts.items() for x in kv]


def test_cli_torchscript_for_boxmot_and_format_from_suffix(ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "reid.torchscript"
    assert main(["export", "--target", "boxmot", "--out", str(out), *_cli_opts(ckpt, {})]) == 0
    printed = capsys.readouterr().out
    assert "(torchscript)" in printed and "ImageNet mean/std, as BoxMOT feeds it" in printed
    assert json.loads((tmp_path / "reid.torchscript.metadata.json").read_text())["model_kwargs"] == {
        "img_size": [32, 16]}
    assert main(["export", "--out", str(tmp_path / "m.safetensors"), *_cli_opts(ckpt, {})]) == 0
    assert main(["export", "--out", str(tmp_path / "m.pt"), "--target", "boxmot",
                 *_cli_opts(ckpt, {})]) == 2
    assert "error: --out" in capsys.readouterr().err


_BLOCKED_EXPORT = """
import sys
sys.modules["onnxscript"] = None  # `import onnxscript` now raises ImportError
from strongreid.cli import main
sys.exit(main(["export", "--format", "onnx", "--out", *sys.argv[1:]]))
"""


@needs_onnx
def test_same_onnx_file_whether_onnxscript_is_importable_or_not(ckpt, tmp_path, capsys) -> None:
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (the dev extra has it)")
    blocked, importable = tmp_path / "blocked.onnx", tmp_path / "importable.onnx"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", _BLOCKED_EXPORT, str(blocked), *_cli_opts(ckpt, {})],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert main(["export", "--format", "onnx", "--out", str(importable), *_cli_opts(ckpt, {})]) == 0
    printed = capsys.readouterr()
    assert "Traceback" not in done.stderr + printed.err + printed.out
    assert done.stdout.replace(str(blocked), "OUT") == printed.out.replace(str(importable), "OUT")
    assert hashlib.sha256(blocked.read_bytes()).digest() == hashlib.sha256(importable.read_bytes()).digest()


def test_boxmot_export_measures_boxmots_preprocessing(ckpt, tiny_synthetic_root, tmp_path, capsys) -> None:
    out = tmp_path / "reid.torchscript"
    data = {"INPUT.INTERPOLATION": "bicubic", "DATASETS.ROOT_DIR": str(tiny_synthetic_root)}
    assert main(["export", "--target", "boxmot", "--out", str(out), *_cli_opts(ckpt, data)]) == 0
    printed = capsys.readouterr().out
    assert "the model was tested with bicubic (PIL) resizing; BoxMOT resizes crops with cv2 INTER_LINEAR" in printed
    sidecar = json.loads((tmp_path / "reid.torchscript.metadata.json").read_text())
    check = sidecar["preprocessing_check"]
    assert sidecar["interpolation"] == "bicubic" and sidecar["flip_aug"] is False
    assert f"mAP {100 * check['mAP_strongreid']:.1f} with strongreid's preprocessing" in printed
    # The strongreid side is `strongreid test`'s number; BoxMOT's resize gives other features.
    assert main(["test", *_cli_opts(ckpt, data), "OUTPUT_DIR", str(tmp_path / "t")]) == 0
    tested = json.loads((tmp_path / "t" / "results.json").read_text())
    assert check["mAP_strongreid"] == pytest.approx(tested["mAP"], abs=1e-9)
    assert check["cosine_min"] <= check["cosine_mean"] < 0.9999
    capsys.readouterr()
    assert main(["export", "--target", "boxmot", "--out", str(out), "--no-preprocessing-check",
                 *_cli_opts(ckpt, data)]) == 0
    assert "measured on" not in capsys.readouterr().out
    assert "preprocessing_check" not in json.loads((tmp_path / "reid.torchscript.metadata.json").read_text())
    empty = {"DATASETS.ROOT_DIR": str(tmp_path / "nowhere")}
    assert main(["export", "--target", "boxmot", "--out", str(out), *_cli_opts(ckpt, empty)]) == 0
    assert "its cost was not measured (" in capsys.readouterr().out
