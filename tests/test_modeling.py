"""Backbones, the BNNeck head, ReIDModel and weight loading."""

from __future__ import annotations

import logging
import math
import urllib.error

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from _train_utils import model_cfg

from strongreid.errors import CheckpointError, ConfigError, StrongReIDError
from strongreid.modeling import (
    BACKBONES,
    GeM,
    ReIDModel,
    build_model,
    create_backbone,
    load_backbone_file,
    load_test_weights,
)
from strongreid.modeling.backbones import IBN, ResNetIBNa
from strongreid.modeling.backbones.osnet import WIDTHS as OSNET_WIDTHS
from strongreid.modeling.weights import canonical_key

ORIGINAL_NAMES = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "se_resnet50", "se_resnet101", "se_resnet152", "se_resnext50", "se_resnext101", "senet154",
    "resnet50_ibn_a",
]


_cfg = model_cfg


def _meta_map(name: str, last_stride: int, size=(256, 128)) -> tuple[nn.Module, torch.Size]:
    # On the meta device, shapes propagate without allocating or computing anything, so even
    # SENet-154 costs a fraction of a second.
    with torch.device("meta"):
        backbone = create_backbone(name, last_stride)
        return backbone, backbone(torch.empty(2, 3, *size)).shape


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------


def test_every_upstream_name_is_registered():
    assert set(ORIGINAL_NAMES) <= set(BACKBONES.names())


# layumi_densenet121 reproduces layumi's --stride 1 (a 2x2 pool at stride 1: 15x7), tested in
# tests/test_layumi_checkpoints.py; SOLIDER's Swins keep their stride 32 as SOLIDER does
# (tests/test_solider_checkpoints.py).
@pytest.mark.parametrize("name", sorted(n for n in BACKBONES.names()
                                        if n != "layumi_densenet121" and not n.startswith("solider_swin_")))
def test_backbone_map_shape_at_256x128(name):
    # The stride-16 path gives 16x8 at 256x128 with LAST_STRIDE 1, 8x4 with 2.
    backbone, shape1 = _meta_map(name, 1)
    _, shape2 = _meta_map(name, 2)
    assert tuple(shape1) == (2, backbone.feat_dim, 16, 8)
    assert tuple(shape2) == (2, backbone.feat_dim, 8, 4)
    if name.startswith("osnet_"):  # OSNet's width: the last of its stage widths
        expected_dim = OSNET_WIDTHS[name.rsplit("_", 2)[-2] + "_" + name.rsplit("_", 1)[-1]][3]
    else:
        expected_dim = 512 if name.endswith(("resnet18", "resnet34")) else 2048
    assert backbone.feat_dim == expected_dim
    assert backbone.arch == name


@pytest.mark.parametrize("last_stride,expected", [(1, (4, 2)), (2, (2, 1))])
def test_resnet18_real_forward_last_stride(last_stride, expected):
    backbone = create_backbone("resnet18", last_stride).eval()
    with torch.no_grad():
        y = backbone(torch.randn(2, 3, 64, 32))
    assert tuple(y.shape) == (2, 512, *expected)
    first = backbone.layer4[0]
    assert first.conv1.stride == (last_stride, last_stride)  # BasicBlock strides its first conv
    assert first.downsample[0].stride == (last_stride, last_stride)


def test_resnet50_last_stride_on_conv2_and_downsample():
    with torch.device("meta"):
        b = create_backbone("resnet50", 1)
    assert b.layer4[0].conv1.stride == (1, 1)
    assert b.layer4[0].conv2.stride == (1, 1)
    assert b.layer4[0].downsample[0].stride == (1, 1)
    assert b.layer3[0].conv2.stride == (2, 2)  # only the last stage changes


def test_resnet_stem_has_relu():
    # The original drops the stem ReLU (a bug); the map entering the max-pool must be >= 0.
    backbone = create_backbone("resnet18", 1).eval()
    seen = []
    backbone.maxpool.register_forward_hook(lambda m, args, out: seen.append(args[0].min().item()))
    with torch.no_grad():
        backbone(torch.randn(1, 3, 64, 32))
    assert seen and seen[0] >= 0.0


def test_ibn_a_layout():
    net = create_backbone("resnet50_ibn_a", 1)
    assert isinstance(net, ResNetIBNa)
    for stage, planes in (("layer1", 64), ("layer2", 128), ("layer3", 256)):
        for block in getattr(net, stage):
            assert isinstance(block.bn1, IBN)
            assert block.bn1.IN.num_features == planes // 2
            assert block.bn1.BN.num_features == planes - planes // 2
            assert isinstance(block.bn2, nn.BatchNorm2d) and isinstance(block.bn3, nn.BatchNorm2d)
    for block in net.layer4:
        assert type(block.bn1) is nn.BatchNorm2d
    keys = net.state_dict().keys()
    assert not any(k.startswith("fc.") for k in keys)
    assert "layer1.0.bn1.IN.weight" in keys and "layer1.0.bn1.BN.running_mean" in keys
    assert isinstance(net.relu, nn.ReLU)


def test_ibn_block_exact_values():
    ibn = IBN(6).train()
    x = torch.randn(4, 6, 5, 3)
    y = ibn(x)
    expected_in = F.instance_norm(x[:, :3], eps=1e-5)
    expected_bn = F.batch_norm(x[:, 3:], None, None, training=True, eps=1e-5)
    torch.testing.assert_close(y[:, :3], expected_in, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[:, 3:], expected_bn, atol=1e-5, rtol=1e-5)


def test_timm_backbones_last_stride():
    b1 = create_backbone("timm:resnet18", 1).eval()
    b2 = create_backbone("timm:resnet18", 2).eval()
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        assert tuple(b1(x).shape) == (1, 512, 4, 2)
        assert tuple(b2(x).shape) == (1, 512, 2, 1)
    assert b1.arch == "timm:resnet18"
    # ConvNeXt: the last downsample conv (2x2, stride 2) is set to stride 1 and keeps the size.
    _, shape1 = _meta_map("timm:convnext_tiny", 1)
    _, shape2 = _meta_map("timm:convnext_tiny", 2)
    assert tuple(shape1) == (2, 768, 16, 8) and tuple(shape2) == (2, 768, 8, 4)
    atto = create_backbone("timm:convnext_atto", 1).eval()
    with torch.no_grad():
        assert tuple(atto(torch.randn(1, 3, 64, 32)).shape) == (1, atto.feat_dim, 4, 2)


def test_timm_last_stride_not_applicable_warns(caplog):
    with caplog.at_level(logging.WARNING), torch.device("meta"):
        b = create_backbone("timm:swin_tiny_patch4_window7_224", 1)
        y = b(torch.empty(1, 3, 224, 224))
    assert "not applicable" in caplog.text
    assert tuple(y.shape) == (1, b.feat_dim, 7, 7)  # NHWC output turned into NCHW


def test_unknown_backbone_names():
    with pytest.raises(StrongReIDError, match="resnet50"):
        create_backbone("resnet05", 1)
    with pytest.raises(ConfigError, match="no_such_net"):
        create_backbone("timm:no_such_net", 1)
    with pytest.raises(ConfigError, match="LAST_STRIDE"):
        create_backbone("resnet18", 3)


# --------------------------------------------------------------------------------------------
# Head
# --------------------------------------------------------------------------------------------


def test_bnneck_init_and_frozen_bias():
    model = ReIDModel(create_backbone("resnet18", 1), num_classes=10)
    bn = model.bottleneck
    assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == 512
    assert not bn.bias.requires_grad and bn.weight.requires_grad
    assert torch.equal(bn.weight, torch.ones(512)) and torch.equal(bn.bias, torch.zeros(512))
    assert model.classifier.bias is None
    w = model.classifier.weight
    assert w.shape == (10, 512)
    # 5120 draws of N(0, 0.001^2): the sample std is within 5% of 0.001 with overwhelming odds.
    assert abs(w.std().item() - 1e-3) < 5e-5 and abs(w.mean().item()) < 5e-5
    assert model.feat_dim == 512 and model.num_classes == 10


def test_bnneck_bias_stays_zero_after_a_step():
    model = ReIDModel(create_backbone("resnet18", 1), num_classes=4).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    logits, _ = model(torch.randn(4, 3, 64, 32))
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert torch.equal(model.bottleneck.bias, torch.zeros(512))


def test_plain_head():
    model = ReIDModel(create_backbone("resnet18", 1), num_classes=6, neck="no")
    assert model.bottleneck is None
    assert model.classifier.bias is not None
    # PyTorch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not N(0, 0.001^2).
    bound = 1 / math.sqrt(512)
    assert model.classifier.weight.abs().max() <= bound
    assert model.classifier.weight.std() > 0.01
    model.train()
    logits, feat = model(torch.randn(2, 3, 64, 32))
    torch.testing.assert_close(logits, model.classifier(feat))
    model.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 32)
        torch.testing.assert_close(model(x), model.pool(model.backbone(x)))


@pytest.mark.parametrize("neck_feat", ["after", "before"])
def test_train_and_eval_outputs(neck_feat):
    model = ReIDModel(create_backbone("resnet18", 1), num_classes=5, neck_feat=neck_feat)
    x = torch.randn(3, 3, 64, 32)
    model.train()
    logits, global_feat = model(x)
    assert logits.shape == (3, 5) and global_feat.shape == (3, 512)
    # Training: global_feat is the pre-BN GAP vector, logits come from the BN feature.
    model.eval()
    with torch.no_grad():
        fmap = model.backbone(x)
        gap = fmap.mean(dim=(2, 3))
        bn = model.bottleneck
        after = (gap - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        out = model(x)
    torch.testing.assert_close(out, after if neck_feat == "after" else gap, atol=1e-5, rtol=1e-5)


def test_gem_exact_value():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    assert GeM(3.0)(x).item() == pytest.approx(((1 + 8 + 27 + 64) / 4) ** (1 / 3), rel=1e-6)
    assert GeM(1.0)(x).item() == pytest.approx(2.5, rel=1e-6)
    model = ReIDModel(create_backbone("resnet18", 1), 3, pooling="gem", gem_p=3.0)
    assert isinstance(model.pool, GeM)


def test_bad_head_options():
    backbone = create_backbone("resnet18", 1)
    with pytest.raises(ConfigError, match="MODEL.NECK"):
        ReIDModel(backbone, 3, neck="bn")
    with pytest.raises(ConfigError, match="NECK_FEAT"):
        ReIDModel(backbone, 3, neck_feat="middle")
    with pytest.raises(ConfigError, match="POOLING"):
        ReIDModel(backbone, 3, pooling="max")


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _torchvision_file(tmp_path, name="resnet18-test.pth"):
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()  # distinct from any fresh init
    sd = net.state_dict()
    path = tmp_path / name
    torch.save(sd, path)
    return path, sd


def test_imagenet_file_loads_and_skips_fc(tmp_path, caplog):
    path, sd = _torchvision_file(tmp_path)
    with caplog.at_level(logging.INFO):
        model = build_model(_cfg(MODEL__PRETRAIN_CHOICE="imagenet", MODEL__PRETRAIN_PATH=str(path)), 7)
    own = model.backbone.state_dict()
    for key, value in own.items():
        assert torch.equal(value, sd[key]), key
    assert "2 classifier tensors skipped" in caplog.text


def test_prefixes_are_stripped(tmp_path):
    _, sd = _torchvision_file(tmp_path)
    wrapped = {"state_dict": {f"module.base.{k}": v for k, v in sd.items()}}
    path = tmp_path / "wrapped.pth"
    torch.save(wrapped, path)
    backbone = create_backbone("resnet18", 1)
    report = load_backbone_file(backbone, path)
    assert not report.missing and not report.unexpected and not report.mismatched
    assert torch.equal(backbone.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])
    assert canonical_key("module.backbone.model.layer1.0.conv1.weight") == "layer1.0.conv1.weight"


def test_timm_backbone_takes_timm_and_cadene_style_keys(tmp_path):
    backbone = create_backbone("timm:resnet18", 1)
    reference = create_backbone("timm:resnet18", 1)
    sd = {k.removeprefix("model."): v + 1.0 if v.is_floating_point() else v
          for k, v in reference.state_dict().items()}
    sd["fc.weight"] = torch.zeros(1000, 512)
    path = tmp_path / "timm.pth"
    torch.save(sd, path)
    report = load_backbone_file(backbone, path)
    assert report.skipped == ["fc.weight"] and not report.missing
    assert torch.equal(backbone.model.conv1.weight, reference.model.conv1.weight + 1.0)


def test_shape_mismatch_and_unexpected_are_reported(tmp_path, caplog):
    _, sd = _torchvision_file(tmp_path)
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    sd["extra.thing"] = torch.zeros(2)
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    backbone = create_backbone("resnet18", 1)
    before = backbone.conv1.weight.clone()
    with caplog.at_level(logging.WARNING):
        report = load_backbone_file(backbone, path)
    assert report.mismatched == [("conv1.weight", (64, 3, 3, 3), (64, 3, 7, 7))]
    assert report.unexpected == ["extra.thing"]
    assert report.missing == ["conv1.weight"]
    assert torch.equal(backbone.conv1.weight, before)  # left as it was
    assert torch.equal(backbone.bn1.weight, sd["bn1.weight"])
    assert "conv1.weight: file (64, 3, 3, 3) vs model (64, 3, 7, 7)" in caplog.text
    assert "extra.thing" in caplog.text


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    _, sd = _torchvision_file(tmp_path)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    backbone = create_backbone("resnet18", 2)
    load_backbone_file(backbone, path)
    assert torch.equal(backbone.layer2[0].bn1.running_var, sd["layer2.0.bn1.running_var"])


def test_unusable_files(tmp_path):
    backbone = create_backbone("resnet18", 1)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone_file(backbone, tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_backbone_file(backbone, garbage)
    pickled = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), pickled)  # a whole pickled module, as ignite 0.1.2 saved
    with pytest.raises(CheckpointError, match="state_dict"):
        load_backbone_file(backbone, pickled)
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="none of its 1 tensors fit the resnet18"):
        load_backbone_file(backbone, other)


def test_offline_published_weights_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # nothing cached
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name in ("resnet18", "timm:resnet18"):
        with pytest.raises(StrongReIDError) as info:
            build_model(_cfg(MODEL__NAME=name, MODEL__PRETRAIN_CHOICE="imagenet"), 3)
        message = str(info.value)
        assert "MODEL.PRETRAIN_PATH" in message and "MODEL.PRETRAIN_CHOICE 'none'" in message
        assert "\n" not in message


def test_published_weights_come_through_the_hub_cache(tmp_path, monkeypatch):
    # resnet50_ibn_a's published file is fetched with torch.hub.load_state_dict_from_url; a file
    # already in the hub cache is used without any network access.
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    conv1 = torch.randn(64, 3, 7, 7)
    torch.save({"conv1.weight": conv1, "fc.weight": torch.zeros(1000, 2048)},
               tmp_path / "checkpoints" / "resnet50_ibn_a-d9d0bb7b.pth")
    model = build_model(_cfg(MODEL__NAME="resnet50_ibn_a", MODEL__PRETRAIN_CHOICE="imagenet"), 3)
    assert torch.equal(model.backbone.conv1.weight, conv1)


def _save_checkpoint(model: ReIDModel, path, arch: str):
    torch.save({"model": model.state_dict(), "arch": arch, "num_classes": model.num_classes,
                "epoch": 3}, path)


def _randomise(model: nn.Module) -> None:
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.normal_()


def test_load_test_weights_same_and_other_class_count(tmp_path, caplog):
    source = ReIDModel(create_backbone("resnet18", 1), 5)
    _randomise(source)
    path = tmp_path / "best.pt"
    _save_checkpoint(source, path, "resnet18")

    same = build_model(_cfg(), 5)
    load_test_weights(same, path)
    for k, v in source.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k

    other = build_model(_cfg(), 9)
    classifier_before = other.classifier.weight.clone()
    with caplog.at_level(logging.INFO):
        report = load_test_weights(other, path)
    assert report.skipped == ["classifier.weight"]
    assert torch.equal(other.classifier.weight, classifier_before)
    assert torch.equal(other.bottleneck.running_mean, source.bottleneck.running_mean)
    assert "5 classes" in caplog.text


def test_load_original_release_format(tmp_path):
    # The original's released models: Baseline state dicts with base.* / bottleneck.* /
    # classifier.*, IBN-a including its unused ImageNet fc.
    source = ReIDModel(create_backbone("resnet50_ibn_a", 1), 4)
    _randomise(source)
    sd = {k.replace("backbone.", "base.", 1): v for k, v in source.state_dict().items()}
    sd["base.fc.weight"] = torch.zeros(1000, 2048)
    sd["base.fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet50_ibn_a_model_120.pth"
    torch.save(sd, path)
    target = ReIDModel(create_backbone("resnet50_ibn_a", 1), 4)
    report = load_test_weights(target, path)
    assert sorted(report.skipped) == ["base.fc.bias", "base.fc.weight"]
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_architecture_mismatch_is_a_checkpoint_error(tmp_path):
    source = ReIDModel(create_backbone("resnet18", 1), 5)
    path = tmp_path / "r18.pt"
    _save_checkpoint(source, path, "resnet18")
    target = ReIDModel(create_backbone("resnet34", 1), 5)
    with pytest.raises(CheckpointError) as info:
        load_test_weights(target, path)
    message = str(info.value)
    assert "resnet18" in message and "resnet34" in message and str(path) in message
    plain = ReIDModel(create_backbone("resnet18", 1), 5, neck="no")
    with pytest.raises(CheckpointError, match="unexpected"):
        load_test_weights(plain, path)


def test_pretrain_choice_self(tmp_path):
    source = ReIDModel(create_backbone("resnet18", 1), 5)
    _randomise(source)
    path = tmp_path / "last.pt"
    _save_checkpoint(source, path, "resnet18")
    model = build_model(_cfg(MODEL__PRETRAIN_CHOICE="self", MODEL__PRETRAIN_PATH=str(path)), 8)
    assert torch.equal(model.backbone.conv1.weight, source.backbone.conv1.weight)
    assert model.classifier.weight.shape == (8, 512)
    with pytest.raises(ConfigError, match="PRETRAIN_PATH"):
        build_model(_cfg(MODEL__PRETRAIN_CHOICE="self"), 8)


def test_loading_with_other_feature_settings_than_training_warns(tmp_path, caplog):
    from strongreid.config import load_config
    from strongreid.config.loader import dump_config
    from strongreid.modeling import build_model
    from strongreid.modeling.loading import load_inference_model

    trained = load_config(None, ["MODEL.NAME", "resnet18", "MODEL.PRETRAIN_CHOICE", "none",
                                 "MODEL.DEVICE", "cpu", "INPUT.SIZE_TEST", "[64, 32]",
                                 "TEST.NECK_FEAT", "before"])
    path = tmp_path / "best.pt"
    torch.save({"model": build_model(trained, 5).state_dict(), "num_classes": 5,
                "arch": "resnet18", "config": dump_config(trained)}, path)
    base = ["MODEL.NAME", "resnet18", "MODEL.PRETRAIN_CHOICE", "none", "MODEL.DEVICE", "cpu"]

    def warnings_for(opts: list[str]) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="strongreid"):
            load_inference_model(load_config(None, base + opts), path)
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    # The defaults (384 x 128, the neck's 'after' feature) are not what the model was trained with.
    (message,) = warnings_for([])
    assert message == (
        f"checkpoint {path} was trained with INPUT.SIZE_TEST [64, 32], TEST.NECK_FEAT before (its "
        "stored config); this run uses the defaults INPUT.SIZE_TEST [384, 128], TEST.NECK_FEAT "
        "after, so its features are not the model's: pass --config with the run's config.yaml, "
        "or set these keys to choose")
    # A value set on purpose is the user's choice; the same values say nothing.
    (message,) = warnings_for(["INPUT.SIZE_TEST", "[128, 64]"])
    assert "TEST.NECK_FEAT before" in message and "SIZE_TEST" not in message
    assert warnings_for(["INPUT.SIZE_TEST", "[64, 32]", "TEST.NECK_FEAT", "before"]) == []
