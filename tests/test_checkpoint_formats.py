"""The checkpoint-format registry and the one inference loader behind test/extract/export/FeatureExtractor.

A toy foreign format (keys `net.*` / `head.*`, 0-255 pixel statistics) is registered for the tests:
it exercises detection, config overrides reaching the transforms, strict loading and the messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from strongreid import FeatureExtractor
from strongreid.config import load_config
from strongreid.errors import CheckpointError, ConfigError
from strongreid.modeling import build_model
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
