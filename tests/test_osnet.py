"""OSNet / OSNet-IBN / OSNet-AIN: layout, torchreid's parameter names, last stride, heads, losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from strongreid.config import get_cfg_defaults
from strongreid.errors import ConfigError, StrongReIDError
from strongreid.losses import build_loss
from strongreid.modeling import BACKBONES, build_model, create_backbone, load_backbone_file
from strongreid.modeling.backbones.osnet import WIDTHS, ChannelGate, OSBlock, OSNet
from strongreid.modeling.outputs import ModelOutput

NAMES = [
    "osnet_x1_0", "osnet_x0_75", "osnet_x0_5", "osnet_x0_25", "osnet_ibn_x1_0",
    "osnet_ain_x1_0", "osnet_ain_x0_75", "osnet_ain_x0_5", "osnet_ain_x0_25",
]

# Facts read off torchreid's (deep-person-reid) model definitions: the number of tensors in the
# state dict of the whole torchreid model (backbone + fc 512 + classifier) and a few keys per
# family with their shapes. fc (Linear, BatchNorm1d: 7 tensors) and classifier (2) are head parts.
TORCHREID_COUNTS = {"osnet_x0_25": 567, "osnet_ibn_x1_0": 568, "osnet_ain_x0_25": 552}
TORCHREID_KEYS = {
    "osnet_x0_25": {
        "conv1.conv.weight": (16, 3, 7, 7),
        "conv1.bn.running_var": (16,),
        "conv2.0.conv2d.3.conv2.weight": (16, 1, 3, 3),
        "conv2.0.gate.fc1.weight": (1, 16, 1, 1),
        "conv2.0.gate.fc2.bias": (16,),
        "conv2.0.downsample.conv.weight": (64, 16, 1, 1),
        "conv2.1.conv3.bn.running_mean": (64,),
        "conv2.2.0.conv.weight": (64, 64, 1, 1),
        "conv3.0.conv3.conv.weight": (96, 24, 1, 1),
        "conv3.2.0.bn.weight": (96,),
        "conv4.1.conv2b.1.bn.bias": (32,),
        "conv5.conv.weight": (128, 128, 1, 1),
    },
    "osnet_ibn_x1_0": {
        "conv1.bn.weight": (64,),
        "conv2.0.IN.weight": (256,),
        "conv2.1.IN.bias": (256,),
        "conv2.2.0.conv.weight": (256, 256, 1, 1),
        "conv4.1.conv3.conv.weight": (512, 128, 1, 1),
    },
    "osnet_ain_x0_25": {
        "conv1.bn.bias": (16,),
        "conv2.0.conv2.3.layers.3.conv2.weight": (16, 1, 3, 3),
        "conv2.0.conv2.0.layers.0.conv1.weight": (16, 16, 1, 1),
        "conv2.0.IN.weight": (64,),
        "conv2.1.conv3.conv.weight": (64, 16, 1, 1),
        "conv3.0.conv3.bn.running_mean": (96,),
        "conv3.1.IN.bias": (96,),
        "pool2.0.conv.weight": (64, 64, 1, 1),
        "pool3.0.bn.weight": (96,),
        "conv4.0.IN.weight": (128,),
        "conv4.1.conv3.bn.weight": (128,),
    },
}
# Keys torchreid does not have: IN-normalised layers carry no running statistics, and an AIN
# block with IN inside the residual has no BN after conv3.
ABSENT = {
    "osnet_ibn_x1_0": ["conv1.bn.running_mean", "conv3.0.IN.weight"],
    "osnet_ain_x0_25": ["conv1.bn.running_var", "conv2.0.conv3.bn.weight", "conv3.0.IN.weight",
                        "conv4.1.IN.weight", "conv2.2.0.conv.weight"],
}


def test_every_size_and_variant_is_registered():
    assert set(NAMES) <= set(BACKBONES.names())


@pytest.mark.parametrize("name", sorted(TORCHREID_KEYS))
def test_parameter_names_are_torchreids(name):
    sd = create_backbone(name, 1).state_dict()
    for key, shape in TORCHREID_KEYS[name].items():
        assert tuple(sd[key].shape) == shape, key
    for key in ABSENT.get(name, []):
        assert key not in sd, key
    assert len(sd) == TORCHREID_COUNTS[name] - 9  # minus torchreid's fc (7) and classifier (2)


@pytest.mark.parametrize(("width", "published_m"), [("x1_0", 2.2), ("x0_75", 1.3), ("x0_5", 0.6),
                                                    ("x0_25", 0.2)])
def test_parameter_counts_match_the_paper(width, published_m):
    # Zhou et al. 2019, Table 4: the counts include the 512-d fc (Linear + BN) after pooling.
    for prefix in ("osnet_", "osnet_ain_"):
        net = create_backbone(prefix + width, 1)
        c = net.feat_dim
        total = sum(p.numel() for p in net.parameters()) + c * 512 + 512 + 2 * 512
        assert round(total / 1e6, 1) == published_m


@pytest.mark.parametrize("name", NAMES)
def test_map_shape_and_last_stride(name):
    # At 256x128: 16x8 (output stride 16, the published network) with last stride 1, 8x4 with 2.
    with torch.device("meta"):
        for last_stride, hw in ((1, (16, 8)), (2, (8, 4))):
            net = create_backbone(name, last_stride)
            y = net(torch.empty(2, 3, 256, 128))
            assert tuple(y.shape) == (2, net.feat_dim, *hw)
    width = name.rsplit("_", 2)[-2] + "_" + name.rsplit("_", 1)[-1]
    assert net.feat_dim == WIDTHS[width][3]


def test_last_stride_two_pools_the_input_of_conv4():
    net = create_backbone("osnet_x0_25", 2)
    assert isinstance(net.last_pool, nn.AvgPool2d) and isinstance(net.conv3[2][1], nn.AvgPool2d)
    assert isinstance(create_backbone("osnet_ain_x0_25", 1).last_pool, nn.Identity)
    x = torch.randn(1, 3, 64, 32)
    one = create_backbone("osnet_x0_25", 1).eval()
    # No parameter depends on the stride: a file of one loads into the other.
    net.load_state_dict(one.state_dict())
    net.eval()
    with torch.no_grad():
        at_conv3 = one.conv3(one.conv2(one.maxpool(one.conv1(x))))
        torch.testing.assert_close(net(x), one.conv5(one.conv4(F.avg_pool2d(at_conv3, 2))))
    with pytest.raises(ConfigError, match="LAST_STRIDE"):
        create_backbone("osnet_x0_25", 3)


def test_channel_gate_exact_value():
    # Zero weights: gate = sigmoid(fc2.bias) whatever the input; ln(3) gives exactly 3/4.
    gate = ChannelGate(16)
    with torch.no_grad():
        for p in gate.parameters():
            p.zero_()
        gate.fc2.bias.fill_(torch.log(torch.tensor(3.0)).item())
    x = torch.arange(16 * 2 * 2, dtype=torch.float32).reshape(1, 16, 2, 2)
    torch.testing.assert_close(gate(x), 0.75 * x)


def test_block_sums_the_four_gated_streams():
    torch.manual_seed(0)
    block = OSBlock(8, 16).eval()
    x = torch.randn(2, 8, 6, 4)
    with torch.no_grad():
        x1 = block.conv1(x)
        streams = [block.conv2a, block.conv2b, block.conv2c, block.conv2d]
        # Depths 1..4 of Lite 3x3 layers: receptive fields 3, 5, 7, 9.
        assert [len(s) if isinstance(s, nn.Sequential) else 1 for s in streams] == [1, 2, 3, 4]
        x2 = sum(block.gate(s(x1)) for s in streams)
        expected = torch.relu(block.conv3(x2) + block.downsample(x))
        torch.testing.assert_close(block(x), expected)


def test_ain_and_ibn_normalise_where_published():
    ain = OSNet(WIDTHS["x0_25"], 1, "ain")
    with_in = [[b.IN is not None for b in stage] for stage in (ain.conv2, ain.conv3, ain.conv4)]
    assert with_in == [[True, True], [False, True], [True, False]]
    assert isinstance(ain.conv1.bn, nn.InstanceNorm2d)
    ibn = OSNet(WIDTHS["x0_25"], 1, "ibn")
    assert [b.IN is not None for b in ibn.conv2[:2]] == [True, True]
    assert all(b.IN is None for b in [*ibn.conv3[:2], *ibn.conv4])
    with pytest.raises(ValueError, match="variant"):
        OSNet(WIDTHS["x0_25"], 1, "abc")


def _cfg(**overrides):
    cfg = get_cfg_defaults()
    cfg.MODEL.NAME = "osnet_x0_25"
    cfg.MODEL.PRETRAIN_CHOICE = "none"
    for key, value in overrides.items():
        section, leaf = key.split("__")
        cfg[section][leaf] = value
    return cfg


@pytest.mark.parametrize(("head", "neck", "pooling", "loss", "id_loss", "dim"), [
    ("baseline", "bnneck", "avg", "triplet_center", "softmax", 128),
    ("baseline", "no", "gem", "triplet", "softmax", 128),
    ("baseline", "bnneck", "gem", "triplet,circle", "arcface", 128),
    ("layumi", "bnneck", "avg", "triplet", "softmax", 512),
    ("torchreid", "bnneck", "avg", "triplet", "softmax", 512),
])
def test_trains_with_heads_and_losses(head, neck, pooling, loss, id_loss, dim):
    cfg = _cfg(MODEL__NAME="osnet_ain_x0_25", MODEL__HEAD=head, MODEL__NECK=neck,
               MODEL__POOLING=pooling, MODEL__METRIC_LOSS_TYPE=loss, MODEL__ID_LOSS_TYPE=id_loss,
               MODEL__IF_WITH_CENTER="yes" if "center" in loss else "no",
               DATALOADER__SAMPLER="softmax_triplet")
    torch.manual_seed(0)
    model = build_model(cfg, 4).train()
    criterion = build_loss(cfg, 4, model.feat_dim)
    x, y = torch.randn(8, 3, 64, 32), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    logits, feat = model(x)
    assert logits.shape == (8, 4) and feat.shape == (8, dim)
    losses = criterion(ModelOutput(logits, feat), y)
    losses["total"].backward()
    assert all(p.grad is not None for p in model.backbone.parameters())
    model.eval()
    assert model(x).shape == (8, dim)


def test_torchreid_imagenet_file_loads_into_the_backbone(tmp_path):
    # torchreid's `osnet_x0_25_imagenet.pth`: the whole classifier's state dict, fc and a
    # 1000-way classifier included; those two are not backbone parts and are skipped.
    source = create_backbone("osnet_x0_25", 1)
    with torch.no_grad():
        for t in source.state_dict().values():
            if t.is_floating_point():
                t.normal_()
    sd = dict(source.state_dict())
    sd.update({"fc.0.weight": torch.zeros(512, 128), "fc.0.bias": torch.zeros(512),
               "fc.1.weight": torch.ones(512), "fc.1.bias": torch.zeros(512),
               "classifier.weight": torch.zeros(1000, 512), "classifier.bias": torch.zeros(1000)})
    path = tmp_path / "osnet_x0_25_imagenet.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    model = build_model(_cfg(MODEL__PRETRAIN_CHOICE="imagenet", MODEL__PRETRAIN_PATH=str(path)), 3)
    report = load_backbone_file(create_backbone("osnet_x0_25", 2), path)
    assert len(report.skipped) == 6 and not report.missing and not report.unexpected
    for k, v in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k


def test_no_automatic_imagenet_download_says_where_to_get_it():
    with pytest.raises(StrongReIDError, match="osnet_ain_x1_0_imagenet.pth.*PRETRAIN_PATH"):
        build_model(_cfg(MODEL__NAME="osnet_ain_x1_0", MODEL__PRETRAIN_CHOICE="imagenet"), 3)
