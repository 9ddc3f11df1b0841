"""layumi's net_last.pth (ft_net, ft_net_dense, PCB) as TEST.WEIGHT.

The reference models are written here from the published architecture (torchvision ResNet-50 /
DenseNet-121 plus layumi's ClassBlock: Linear -> BatchNorm1d -> Dropout -> Linear), with layumi's
module names, so their state dicts are files as layumi's train.py saves them; the test features
are computed the way layumi's test.py computes them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from strongreid import FeatureExtractor
from strongreid.config import load_config
from strongreid.errors import CheckpointError
from strongreid.modeling.checkpoint import read_checkpoint
from strongreid.modeling.formats import CHECKPOINT_FORMATS, detect_format
from strongreid.modeling.loading import load_inference_model

OPTS = ["MODEL.DEVICE", "cpu", "MODEL.AMP", "off", "MODEL.CHANNELS_LAST", "off", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.PRETRAIN_CHOICE", "none", "TEST.IMS_PER_BATCH", "2"]
NUM_CLASSES = 7


def class_block(in_dim: int, linear: int, classes: int) -> nn.Module:
    """layumi's ClassBlock as modules named add_block / classifier (relu off, dropout 0.5)."""
    block = nn.Module()
    block.add_block = nn.Sequential(nn.Linear(in_dim, linear), nn.BatchNorm1d(linear), nn.Dropout(0.5))
    block.classifier = nn.Sequential(nn.Linear(linear, classes))
    return block


def randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)


class RefFtNet(nn.Module):
    """ft_net: ResNet-50 (`--stride 1` puts layer4's first block at stride 1), GAP, ClassBlock."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.model = torchvision.models.resnet50(weights=None)
        if stride == 1:
            self.model.layer4[0].downsample[0].stride = (1, 1)
            self.model.layer4[0].conv2.stride = (1, 1)
        self.classifier = class_block(2048, 512, NUM_CLASSES)

    def test_feature(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
        return self.classifier.add_block(x.mean(dim=(2, 3)))


class RefDense(nn.Module):
    """ft_net_dense: DenseNet-121 `features` + an average pool appended to them (no ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torchvision.models.densenet121(weights=None)
        self.classifier = class_block(1024, 512, NUM_CLASSES)

    def test_feature(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.add_block(self.model.features(x).mean(dim=(2, 3)))


class RefPCB(nn.Module):
    """PCB: ResNet-50 with layer4 at stride 1, 6 stripes, six ClassBlock(2048, linear 256)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torchvision.models.resnet50(weights=None)
        self.model.layer4[0].downsample[0].stride = (1, 1)
        self.model.layer4[0].conv2.stride = (1, 1)
        for i in range(6):
            setattr(self, f"classifier{i}", class_block(2048, 256, NUM_CLASSES))

    def test_feature(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
        stripes = nn.functional.adaptive_avg_pool2d(x, (6, 1)).view(x.size(0), x.size(1), 6)
        # test.py: each part divided by its norm times sqrt(6), then ff.view(n, -1).
        norm = stripes.norm(p=2, dim=1, keepdim=True) * math.sqrt(6)
        return (stripes / norm).reshape(x.size(0), -1)


def write_layumi(path: Path, ref: nn.Module, stride: int | None = None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    for p in ref.parameters():
        p.data.normal_(0, 0.02)
    randomise_bn(ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref.state_dict(), path)
    if stride is not None:
        (path.parent / "opts.yaml").write_text(f"stride: {stride}\nlinear_num: 512\ndroprate: 0.5\n")
    return path


def check_every_key_consumed(path: Path, model: nn.Module) -> None:
    raw = read_checkpoint(path)
    converted = CHECKPOINT_FORMATS.get("layumi")().convert(raw, path)
    tensors = {k for k, v in raw.items() if isinstance(v, torch.Tensor)}
    assert len(converted.state) + len(converted.ignored) == len(tensors)
    assert set(converted.ignored) <= {"model.fc.weight", "model.fc.bias", "model.classifier.weight",
                                      "model.classifier.bias"}
    assert set(converted.state) == set(model.state_dict())


@pytest.mark.parametrize("stride", [1, 2])
def test_ft_net_features_match_layumi(tmp_path, stride):
    torch.manual_seed(1)
    ref = RefFtNet(stride)
    path = write_layumi(tmp_path / "ft_ResNet50" / "net_last.pth", ref, stride)
    raw = read_checkpoint(path)
    assert detect_format(raw) == "layumi"
    loaded = load_inference_model(load_config(None, OPTS), path)
    assert loaded.format == "layumi"
    assert loaded.cfg.MODEL.HEAD == "layumi" and loaded.cfg.MODEL.LAST_STRIDE == stride
    assert list(loaded.cfg.INPUT.SIZE_TEST) == [256, 128]
    check_every_key_consumed(path, loaded.model)
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        expected = ref.eval().test_feature(x)
        got = loaded.model(x)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_feature_extractor_and_data_parallel_prefix(tmp_path):
    ref = RefFtNet(2)
    path = write_layumi(tmp_path / "m" / "net_last.pth", ref, 2)
    # DataParallel / swa AveragedModel files carry `module.` (and n_averaged).
    state = {f"module.{k}": v for k, v in torch.load(path, weights_only=True).items()}
    state["n_averaged"] = torch.tensor(3)
    averaged = tmp_path / "m" / "net_average.pth"
    torch.save(state, averaged)
    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        expected = nn.functional.normalize(ref.eval().test_feature(x), dim=1)
    for weights in (path, averaged):
        extractor = FeatureExtractor(config=load_config(None, OPTS), weights=weights, device="cpu")
        assert extractor.input_size == (256, 128) and extractor.feat_dim == 512
        torch.testing.assert_close(extractor(x), expected, rtol=1e-4, atol=1e-5)


def test_ft_net_dense_features_match_layumi(tmp_path):
    torch.manual_seed(2)
    ref = RefDense()
    path = write_layumi(tmp_path / "dense" / "net_last.pth", ref, stride=2)
    loaded = load_inference_model(load_config(None, OPTS), path)
    assert loaded.cfg.MODEL.NAME == "layumi_densenet121"
    check_every_key_consumed(path, loaded.model)
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), ref.eval().test_feature(x), rtol=1e-4, atol=1e-5)


def test_pcb_features_match_layumi(tmp_path):
    torch.manual_seed(3)
    ref = RefPCB()
    path = write_layumi(tmp_path / "PCB" / "net_last.pth", ref)  # no opts.yaml: PCB is stride 1
    loaded = load_inference_model(load_config(None, OPTS), path)
    assert loaded.cfg.MODEL.HEAD == "pcb" and list(loaded.cfg.INPUT.SIZE_TEST) == [384, 192]
    check_every_key_consumed(path, loaded.model)
    x = torch.randn(2, 3, 96, 48)
    with torch.no_grad():
        got = loaded.model(x)
    assert got.shape == (2, 2048 * 6)
    torch.testing.assert_close(got, ref.eval().test_feature(x), rtol=1e-4, atol=1e-5)


def test_wrong_files_get_one_message_naming_them(tmp_path):
    ref = RefFtNet(2)
    path = write_layumi(tmp_path / "a" / "net_last.pth", ref, 2)
    state = torch.load(path, weights_only=True)
    del state["model.layer3.0.conv1.weight"]
    broken = tmp_path / "a" / "net_broken.pth"
    torch.save(state, broken)
    with pytest.raises(CheckpointError, match=r"net_broken\.pth is a layumi ft_net .*1 missing "
                                              r"\(backbone\.layer3\.0\.conv1\.weight\)"):
        load_inference_model(load_config(None, OPTS), broken)
    swin = tmp_path / "a" / "net_swin.pth"
    torch.save({"model.layers.0.blocks.0.norm1.weight": torch.ones(4),
                "classifier.add_block.0.weight": torch.ones(512, 1024),
                "classifier.classifier.0.weight": torch.ones(3, 512)}, swin)
    with pytest.raises(CheckpointError, match=r"net_swin\.pth has layumi's classifier keys but a "
                                              r"backbone strongreid does not map.*ft_net \(ResNet-50\)"):
        load_inference_model(load_config(None, OPTS), swin)


def test_layumi_dense_through_test_and_export(tmp_path):
    """`strongreid test` on a layumi folder with layumi's file, then `export` and reloading it."""
    import json

    from PIL import Image

    from strongreid.cli import main
    from strongreid.deploy.export import export_model

    torch.manual_seed(4)
    ref = RefDense()
    path = write_layumi(tmp_path / "model" / "ft_net_dense" / "net_last.pth", ref, stride=2)
    data = tmp_path / "Market" / "pytorch"
    names = {"query": ["0001_c1s1_001051_00.jpg", "0002_c2s1_000301_00.jpg"],
             "gallery": ["0001_c2s1_000451_03.jpg", "0001_c1s1_000551_01.jpg",
                         "0002_c1s1_000801_01.jpg", "0000_c3s1_000151_01.jpg"]}
    rng = torch.Generator().manual_seed(0)
    for split, files in names.items():
        for name in files:
            (data / split / name[:4]).mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (48, 24, 3), generator=rng, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(data / split / name[:4] / name)
    out = tmp_path / "run"
    opts = OPTS + ["DATASETS.NAMES", "layumi", "DATASETS.ROOT_DIR", str(tmp_path), "TEST.WEIGHT", str(path),
                   "TEST.AP", "trapezoid", "TEST.UNMATCHED", "fail", "TEST.FLIP_AUG", "True",
                   "OUTPUT_DIR", str(out)]
    assert main(["test", *opts]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["num_query"] == 2 and res["num_gallery"] == 4 and res["flip"] is True
    exported = tmp_path / "dense.safetensors"
    cfg = load_config(None, opts)
    _, diff, _ = export_model(cfg, "safetensors", exported)
    assert diff == 0.0
    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():  # the exported config keeps TEST.FLIP_AUG True: layumi's flip sum
        ref.eval()
        expected = nn.functional.normalize(ref.test_feature(x) + ref.test_feature(x.flip(3)), dim=1)
    reloaded = FeatureExtractor(None, exported, device="cpu")
    assert reloaded.flip
    assert reloaded.cfg.MODEL.NAME == "layumi_densenet121" and reloaded.cfg.MODEL.HEAD == "layumi"
    torch.testing.assert_close(reloaded(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("last_stride", "rows_cols"), [(1, (15, 7)), (2, (8, 4))])
def test_layumi_densenet_map_at_256x128(last_stride, rows_cols):
    from strongreid.modeling.backbones import create_backbone

    with torch.device("meta"):
        backbone = create_backbone("layumi_densenet121", last_stride)
        shape = backbone(torch.empty(2, 3, 256, 128)).shape
    # layumi's --stride 1 sets transition3's 2x2 average pool to stride 1: one row/column fewer.
    assert tuple(shape) == (2, 1024, *rows_cols) and backbone.feat_dim == 1024
