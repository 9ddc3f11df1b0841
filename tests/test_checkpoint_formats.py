"""The checkpoint-format registry and the one inference loader behind test/extract/export/FeatureExtractor.

A toy foreign format (keys `net.*` / `head.*`, 0-255 pixel statistics) is registered for the tests:
it exercises detection, config overrides reaching the transforms, strict loading and the messages.
Files that are no checkpoint at all (a text file, an error page, a git-LFS pointer, an image...)
are each one CheckpointError that says what the file is.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from strongreid import FeatureExtractor
from strongreid.cli import main
from strongreid.config import load_config
from strongreid.errors import CheckpointError, ConfigError
from strongreid.modeling import build_model
from strongreid.modeling.checkpoint import read_checkpoint
from strongreid.modeling.formats import CHECKPOINT_FORMATS, NATIVE, Converted, detect_format
from strongreid.modeling.loading import load_inference_model

OPTS = ["MODEL.DEVICE", "cpu", "MODEL.NAME", "resnet18", "MODEL.PRETRAIN_CHOICE", "none",
        "MODEL.AMP", "off", "MODEL.CHANNELS_LAST", "off", "INPUT.SIZE_TEST", "[32, 16]",
        "TEST.IMS_PER_BATCH", "4"]
TOY_MEAN = [0.5, 0.25, 0.125]


class ToyFormat:
    """Another project's files: {'net_state': {'net.<backbone key>', 'head.<neck key>'}, 'toy': 1}."""

    description = "the toy project's checkpoints"

    def detect(self, raw: Mapping[str, Any]) -> bool:
        return raw.get("toy") == 1

    def convert(self, raw: Mapping[str, Any], path: Path) -> Converted:
        state = {}
        for key, tensor in raw["net_state"].items():
            if key.startswith("net."):
                state["backbone." + key[4:]] = tensor
            elif key.startswith("head."):
                state[key[5:]] = tensor
        return Converted(state=state, overrides={"MODEL.NAME": "resnet18", "INPUT.PIXEL_MEAN": TOY_MEAN},
                         num_classes=int(raw["net_state"]["head.classifier.weight"].shape[0]),
                         source="toy project", ignored=["optimizer"])


@pytest.fixture
def toy_format():
    CHECKPOINT_FORMATS.register("toy")(ToyFormat)
    yield
    CHECKPOINT_FORMATS._items.pop("toy")


def toy_file(path: Path, drop: str | None = None) -> tuple[Path, nn.Module]:
    torch.manual_seed(3)
    cfg = load_config(None, OPTS)
    model = build_model(cfg, 7).eval()
    state = {}
    for key, tensor in model.state_dict().items():
        new = "net." + key[len("backbone."):] if key.startswith("backbone.") else "head." + key
        state[new] = tensor
    if drop:
        state.pop(drop)
    torch.save({"net_state": state, "toy": 1, "optimizer": {}}, path)
    return path, model


def test_registry_order_and_native_fallback(toy_format) -> None:
    assert detect_format({"toy": 1}) == "toy"
    assert detect_format({"model": {}}) == NATIVE
    assert CHECKPOINT_FORMATS.names_in_order()[-1] == "toy"


def test_foreign_checkpoint_loads_strictly_with_its_config(toy_format, tmp_path) -> None:
    path, reference = toy_file(tmp_path / "toy.pth")
    # The caller's config says resnet34 and ImageNet statistics: the file's format decides.
    cfg = load_config(None, [*OPTS[:2], "MODEL.NAME", "resnet34", *OPTS[4:]])
    loaded = load_inference_model(cfg, path)
    assert loaded.format == "toy"
    assert loaded.cfg.MODEL.NAME == "resnet18"
    assert list(loaded.cfg.INPUT.PIXEL_MEAN) == TOY_MEAN
    assert loaded.cfg.MODEL.PRETRAIN_CHOICE == "none"
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), reference(x))


def test_feature_extractor_uses_the_formats_pixel_statistics(toy_format, tmp_path) -> None:
    path, reference = toy_file(tmp_path / "toy.pth")
    extractor = FeatureExtractor(load_config(None, OPTS), path, device="cpu")
    assert extractor.checkpoint_format == "toy"
    image = np.full((32, 16, 3), 128, dtype=np.uint8)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    by_hand = (torch.full((1, 3, 32, 16), 128 / 255) - torch.tensor(TOY_MEAN).view(1, 3, 1, 1)) / std
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference(by_hand), dim=1)
    assert torch.allclose(extractor([image]), expected, atol=1e-5)


def test_a_missing_tensor_is_named(toy_format, tmp_path) -> None:
    path, _ = toy_file(tmp_path / "toy.pth", drop="net.layer4.1.bn2.weight")
    with pytest.raises(CheckpointError, match=r"toy project checkpoint.*1 missing \(backbone.layer4.1.bn2.weight\)"):
        load_inference_model(load_config(None, OPTS), path)


def test_explicit_and_unknown_formats(toy_format, tmp_path) -> None:
    path, _ = toy_file(tmp_path / "toy.pth")
    with pytest.raises(ConfigError, match="MODEL.CHECKPOINT_FORMAT = 'nope' is not a known format.*toy"):
        load_inference_model(load_config(None, [*OPTS, "MODEL.CHECKPOINT_FORMAT", "nope"]), path)
    # Forcing the native reader on a foreign file fails on its keys, naming the file.
    with pytest.raises(CheckpointError, match="toy.pth"):
        load_inference_model(load_config(None, [*OPTS, "MODEL.CHECKPOINT_FORMAT", "strongreid"]), path)
    explicit = load_inference_model(load_config(None, [*OPTS, "MODEL.CHECKPOINT_FORMAT", "toy"]), path)
    assert explicit.format == "toy"


# -- files that are not checkpoints -------------------------------------------------------------

class Opaque:
    """A class whose instances weights_only=True refuses to unpickle."""


def _cut(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _onnx_bytes() -> bytes:
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    return helper.make_model(graph, producer_name="strongreid").SerializeToString()


def read_error(path: Path) -> str:
    """read_checkpoint's message for `path`; any other exception fails the test."""
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    return str(info.value)


TEXT_KINDS = {
    "text.pt": (b"hello world\n", "it is a text file (it starts 'hello world'), not a checkpoint: give "
                "the .pt/.pth file written by training (OUTPUT_DIR/best.pt) or downloaded from a model zoo"),
    "page.pth": (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n",
                 "it is an HTML/XML page, not a checkpoint (a download that saved an error or login "
                 "page?): download the file again from a direct link and check its size"),
    "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2146\nsize 94371234\n",
                "it is a git-LFS pointer (a small text file that stands for the real one): the "
                "checkpoint itself was never downloaded. Run `git lfs pull` in the repository it came "
                "from, or download the file from the model's page"),
    "photo.pt": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01" + bytes(64),
                 "it is a JPEG image, not a checkpoint: check that the weights argument names the model file"),
    "empty.pt": (b"", "the file is empty (0 bytes): a download or save was cut short; download or copy it again"),
}


@pytest.mark.parametrize("name", list(TEXT_KINDS))
def test_a_file_of_another_kind_is_named(tmp_path, name) -> None:
    data, what = TEXT_KINDS[name]
    path = tmp_path / name
    path.write_bytes(data)
    assert read_error(path) == f"cannot read checkpoint {path}: {what}"


def test_onnx_and_random_bytes(tmp_path) -> None:
    onnx_file = tmp_path / "exported.pt"  # told by its bytes, not its name
    onnx_file.write_bytes(_onnx_bytes())
    assert read_error(onnx_file) == (
        f"cannot read checkpoint {onnx_file}: it is an ONNX model, not a PyTorch checkpoint: "
        "strongreid loads models from their .pt checkpoint; give the checkpoint it was exported "
        "from (e.g. OUTPUT_DIR/best.pt)")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(random.Random(0).randbytes(300))  # starts cd 07 2c d8: nothing known
    message = read_error(noise)
    assert message.startswith(f"cannot read checkpoint {noise}: it is not a PyTorch checkpoint "
                              "(it starts with bytes cd 07 2c d8 be 6f 9f 62; torch.load: ")
    assert message.endswith("): give a file written by torch.save, such as training's OUTPUT_DIR/best.pt")
    assert "\n" not in message and "PyTorch 2.6" not in message  # torch's paragraph is left out


def test_a_folder_names_the_checkpoints_inside(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("epoch_3.pth", "last.pt", "best.pt", "log.txt"):
        (run / name).write_bytes(b"")
    assert read_error(run) == (f"checkpoint {run} is a folder, not a file: give one checkpoint inside "
                               f"it, e.g. {run / 'best.pt'} (it holds best.pt, last.pt, epoch_3.pth)")
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert read_error(empty).startswith(f"checkpoint {empty} is a folder, not a file, and holds no checkpoint")
    assert read_error(tmp_path / "absent.pt").startswith(f"checkpoint {tmp_path / 'absent.pt'} does not exist")


def test_truncated_checkpoints(tmp_path) -> None:
    state = {"model": {"w": torch.zeros(256)}}
    zipped = tmp_path / "cut.pt"
    torch.save(state, zipped)
    assert read_error(_cut(zipped, 0.5)) == (
        f"cannot read checkpoint {zipped}: it is a zip archive (the format of torch.save since "
        "PyTorch 1.6) that is truncated or corrupt (its index at the end cannot be read): a download "
        "or copy was cut short; download or copy it again")
    legacy = tmp_path / "old.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    message = read_error(_cut(legacy, 0.5))
    assert message.startswith(f"cannot read checkpoint {legacy}: it is a PyTorch checkpoint (the "
                              "format before PyTorch 1.6) that is truncated (")
    assert message.endswith("): a download or copy was cut short; download or copy it again")


def test_pickled_objects_keep_their_own_message(tmp_path) -> None:
    path = tmp_path / "opaque.pt"
    torch.save({"model": Opaque()}, path)
    message = read_error(path)
    assert message.startswith(f"cannot read checkpoint {path}: it holds a pickled ")
    assert "Opaque, not only tensors" in message and "save `model.state_dict()` instead" in message
    # pickle.dump, not torch.save: no GLOBAL was refused, the format itself is not torch's.
    dumped = tmp_path / "dumped.pkl"
    dumped.write_bytes(pickle.dumps({"w": [1.0]}))
    assert read_error(dumped).startswith(f"cannot read checkpoint {dumped}: it is a Python pickle "
                                         "written by pickle.dump, not by torch.save")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is deprecated; users still have files
def test_exports_given_as_checkpoints(tmp_path) -> None:
    from safetensors.torch import save_file

    renamed = tmp_path / "model.pt"
    save_file({"w": torch.zeros(2)}, str(renamed))
    assert read_error(renamed).startswith(f"cannot read checkpoint {renamed}: it is a safetensors "
                                          "file: rename it to model.safetensors")
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(scripted))
    assert read_error(scripted).startswith(f"cannot read checkpoint {scripted}: it is a TorchScript export")


def test_cli_says_one_line_for_a_text_file(tmp_path, capsys) -> None:
    text = tmp_path / "text.pt"
    text.write_text("hello world\n")
    rc = main(["export", "--out", str(tmp_path / "m.onnx"), *OPTS, "TEST.WEIGHT", str(text)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: cannot read checkpoint {text}: {TEXT_KINDS['text.pt'][1]}"]
