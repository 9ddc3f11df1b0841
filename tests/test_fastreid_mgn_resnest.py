"""fast-reid's MGN and ResNeSt files: real key names and shapes, fast-reid's forward, every command.

The files are built with fast-reid's key names (checked against facts read off its
meta_arch/mgn.py, backbones/resnest.py, layers/splat.py and heads/embedding_head.py) and random
weights; the expected features come from fast-reid's forward written out below over the file's
tensors, not from strongreid's modules.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from strongreid import FeatureExtractor
from strongreid.cli import main
from strongreid.config import load_config
from strongreid.errors import CheckpointError, ConfigError
from strongreid.modeling import HEADS, create_backbone
from strongreid.modeling.formats import detect_format
from strongreid.modeling.loading import load_inference_model

OPTS = ["MODEL.DEVICE", "cpu", "MODEL.NAME", "resnet18", "MODEL.PRETRAIN_CHOICE", "none",
        "MODEL.AMP", "off", "MODEL.CHANNELS_LAST", "off", "TEST.IMS_PER_BATCH", "8"]
GEN = torch.Generator().manual_seed(0)
X16 = torch.randn(16, 3, 64, 32, generator=GEN)
# MGN cuts branch maps into 3 rows: 96 high gives 6 rows at stride 16.
X16_MGN = torch.randn(16, 3, 96, 32, generator=GEN)

# Facts read off fast-reid's build_resnest_backbone (50x: radix 2, deep stem of width 32,
# avg_down, avd) and SplAtConv2d (inter channels max(in * radix / 4, 32)).
FASTREID_S50 = {
    "backbone.conv1.0.weight": (32, 3, 3, 3),
    "backbone.conv1.1.running_var": (32,),
    "backbone.conv1.3.weight": (32, 32, 3, 3),
    "backbone.conv1.6.weight": (64, 32, 3, 3),
    "backbone.bn1.weight": (64,),
    "backbone.layer1.0.conv1.weight": (64, 64, 1, 1),
    "backbone.layer1.0.conv2.conv.weight": (128, 32, 3, 3),
    "backbone.layer1.0.conv2.bn0.bias": (128,),
    "backbone.layer1.0.conv2.fc1.weight": (32, 64, 1, 1),
    "backbone.layer1.0.conv2.fc1.bias": (32,),
    "backbone.layer1.0.conv2.bn1.running_mean": (32,),
    "backbone.layer1.0.conv2.fc2.weight": (128, 32, 1, 1),
    "backbone.layer1.0.downsample.1.weight": (256, 64, 1, 1),
    "backbone.layer2.0.downsample.2.running_var": (512,),
    "backbone.layer3.5.bn3.weight": (1024,),
    "backbone.layer4.0.conv2.fc1.weight": (256, 512, 1, 1),
    "backbone.layer4.2.conv2.conv.weight": (1024, 256, 3, 3),
}
# Stem: 3 convs + 2 BNs (5 tensors each) + bn1 = 18; a block: conv1, bn1, conv2 (conv, bn0,
# fc1 w+b, bn1, fc2 w+b = 15), conv3, bn3 = 27; a shortcut: conv + BN = 6. 16 blocks, 4 shortcuts.
FASTREID_S50_BACKBONE_TENSORS = 18 + 16 * 27 + 4 * 6

# Facts read off fast-reid's MGN (R50-ibn, EMBEDDING_DIM 256, GeneralizedMeanPoolingP).
FASTREID_MGN_R50_IBN = {
    "backbone.0.weight": (64, 3, 7, 7),
    "backbone.1.running_mean": (64,),
    "backbone.4.0.bn1.IN.weight": (32,),
    "backbone.5.3.conv3.weight": (512, 128, 1, 1),
    "backbone.6.conv1.weight": (256, 512, 1, 1),
    "backbone.6.bn1.IN.bias": (128,),
    "backbone.6.downsample.0.weight": (1024, 512, 1, 1),
    "b1.0.0.bn1.IN.weight": (128,),
    "b1.0.4.conv3.weight": (1024, 256, 1, 1),
    "b1.1.0.downsample.0.weight": (2048, 1024, 1, 1),
    "b2.0.2.bn1.BN.running_var": (128,),
    "b2.1.0.downsample.1.running_var": (2048,),
    "b3.1.2.bn3.weight": (2048,),
    "b1_head.pool_layer.p": (1,),
    "b33_head.bottleneck.0.weight": (256, 2048, 1, 1),
    "b21_head.bottleneck.1.running_mean": (256,),
    "b2_head.weight": (9, 256),
}
MGN_HEADS = ("b1_head", "b2_head", "b3_head", "b21_head", "b22_head", "b31_head", "b32_head", "b33_head")


def _randomise(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The module's state with random norm parameters and statistics (a trained look)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in module.state_dict().items():
        if t.is_floating_point() and t.ndim == 1 and not key.endswith(".p"):
            if key.endswith(("running_var", "weight")):
                t = torch.rand(t.shape, generator=g) + 0.5
            else:  # running_mean, bias
                t = torch.randn(t.shape, generator=g) * 0.05
        state[key] = t.clone()
    module.load_state_dict(state)
    return state


def _bn(x: torch.Tensor, s: dict, p: str) -> torch.Tensor:
    return F.batch_norm(x, s[p + "running_mean"], s[p + "running_var"], s[p + "weight"], s[p + "bias"],
                        False, 0.0, 1e-5)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=1)


# --------------------------------------------------------------------------------------------
# fast-reid's ResNeSt forward, over the file's tensors
# --------------------------------------------------------------------------------------------


def _split_attention(x: torch.Tensor, s: dict, p: str, dilation: int) -> torch.Tensor:
    # SplAtConv2d, radix 2, one group: two grouped 3x3 convs, their sum pooled, fc1-bn-relu-fc2,
    # a softmax across the two for each channel, the weighted sum of the two.
    x = F.relu(_bn(F.conv2d(x, s[p + "conv.weight"], None, 1, dilation, dilation, groups=2), s, p + "bn0."))
    first, second = torch.chunk(x, 2, dim=1)
    gap = (first + second).mean((2, 3), keepdim=True)
    gap = F.relu(_bn(F.conv2d(gap, s[p + "fc1.weight"], s[p + "fc1.bias"]), s, p + "bn1."))
    att = F.conv2d(gap, s[p + "fc2.weight"], s[p + "fc2.bias"]).flatten(1)
    att = att.view(att.shape[0], 2, -1).softmax(dim=1)
    return first * att[:, 0, :, None, None] + second * att[:, 1, :, None, None]


def _resnest_block(x, s, p, stride, dilation, avd) -> torch.Tensor:
    out = F.relu(_bn(F.conv2d(x, s[p + "conv1.weight"]), s, p + "bn1."))
    out = _split_attention(out, s, p + "conv2.", dilation)
    if avd:  # the stride is a 3x3 average pool after the split attention (stride 1 included)
        out = F.avg_pool2d(out, 3, stride, 1)
    out = _bn(F.conv2d(out, s[p + "conv3.weight"]), s, p + "bn3.")
    shortcut = x
    if p + "downsample.1.weight" in s:
        if stride > 1:
            shortcut = F.avg_pool2d(shortcut, stride, stride, ceil_mode=True, count_include_pad=False)
        shortcut = _bn(F.conv2d(shortcut, s[p + "downsample.1.weight"]), s, p + "downsample.2.")
    return F.relu(out + shortcut)


def fastreid_resnest(x: torch.Tensor, s: dict, p: str = "backbone.") -> torch.Tensor:
    """fast-reid's ResNeSt at LAST_STRIDE 1: layer4 undilated in its first block (with a stride-1
    avd pool), dilation 2 in the others."""
    stem = F.relu(_bn(F.conv2d(x, s[p + "conv1.0.weight"], None, 2, 1), s, p + "conv1.1."))
    stem = F.relu(_bn(F.conv2d(stem, s[p + "conv1.3.weight"], None, 1, 1), s, p + "conv1.4."))
    stem = F.conv2d(stem, s[p + "conv1.6.weight"], None, 1, 1)
    x = F.max_pool2d(F.relu(_bn(stem, s, p + "bn1.")), 3, 2, 1)
    # (stage, stride, dilation of the blocks after the first, avd in the first block)
    for stage, stride, dilation, avd in ((1, 1, 1, False), (2, 2, 1, True), (3, 2, 1, True), (4, 1, 2, True)):
        i = 0
        while f"{p}layer{stage}.{i}.conv1.weight" in s:
            first = i == 0
            x = _resnest_block(x, s, f"{p}layer{stage}.{i}.", stride if first else 1,
                               1 if first else dilation, avd and first)
            i += 1
    return x


def _fastreid_s50_file(seed: int = 3, num_classes: int = 9) -> dict[str, torch.Tensor]:
    backbone = create_backbone("fastreid_resnest50", 1).eval()
    state = {f"backbone.{k}": v for k, v in _randomise(backbone, seed).items()}
    g = torch.Generator().manual_seed(seed + 1)
    state.update({
        "heads.bottleneck.0.weight": torch.rand(2048, generator=g) + 0.5,
        "heads.bottleneck.0.bias": torch.zeros(2048),
        "heads.bottleneck.0.running_mean": torch.randn(2048, generator=g) * 0.1,
        "heads.bottleneck.0.running_var": torch.rand(2048, generator=g) + 0.5,
        "heads.bottleneck.0.num_batches_tracked": torch.tensor(3),
        "heads.weight": torch.randn(num_classes, 2048, generator=g),
    })
    return state


def test_fastreid_bot_s50_file_loads_and_computes_fastreids_features(tmp_path):
    state = _fastreid_s50_file()
    for key, shape in FASTREID_S50.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(k.startswith("backbone.") for k in state) == FASTREID_S50_BACKBONE_TENSORS
    path = tmp_path / "market_bot_S50.pth"
    torch.save({"model": state, "iteration": 100}, path)
    assert detect_format(torch.load(path, weights_only=True)) == "fastreid"
    loaded = load_inference_model(load_config(None, OPTS), path)
    c = loaded.cfg
    assert (c.MODEL.NAME, c.MODEL.POOLING, c.MODEL.LAST_STRIDE, c.INPUT.INTERPOLATION) == (
        "fastreid_resnest50", "avg", 1, "bicubic")
    assert list(c.INPUT.SIZE_TEST) == [256, 128]
    assert any("AGW(S50)" in w and "MODEL.POOLING gem" in w for w in loaded.warnings)
    with torch.no_grad():
        pooled = fastreid_resnest(X16, state).mean((2, 3))
        expected = _bn(pooled, state, "heads.bottleneck.0.")
        got = loaded.model(X16)
    assert _cosines(got, expected).min() >= 0.9999
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)

    # AGW(S50): the same tensors with GeM p = 3, which only the user can say.
    agw = load_inference_model(load_config(None, [*OPTS, "MODEL.POOLING", "gem"]), path)
    assert (agw.cfg.MODEL.POOLING, agw.cfg.MODEL.GEM_P, agw.warnings) == ("gem", 3.0, ())


def test_fastreid_sbs_s50_and_s101_are_named_from_their_keys(tmp_path):
    state = _fastreid_s50_file(seed=4)
    state["heads.pool_layer.p"] = torch.tensor([2.5])
    torch.save({"model": state}, tmp_path / "market_sbs_S50.pth")
    loaded = load_inference_model(load_config(None, OPTS), tmp_path / "market_sbs_S50.pth")
    c = loaded.cfg
    assert (c.MODEL.NAME, c.MODEL.POOLING, c.MODEL.GEM_P, list(c.INPUT.SIZE_TEST)) == (
        "fastreid_resnest50", "gem", 2.5, [384, 128])
    with torch.no_grad():
        fmap = fastreid_resnest(X16[:4], state).clamp(min=1e-6)
        expected = _bn(fmap.pow(2.5).mean((2, 3)).pow(1 / 2.5), state, "heads.bottleneck.0.")
        assert _cosines(loaded.model(X16[:4]), expected).min() >= 0.9999

    # S101: stem width 64 (bn1 over 128 channels), 23 blocks in layer3.
    s101 = {f"backbone.{k}": v for k, v in create_backbone("fastreid_resnest101", 1).state_dict().items()}
    assert tuple(s101["backbone.conv1.0.weight"].shape) == (64, 3, 3, 3)
    assert tuple(s101["backbone.bn1.weight"].shape) == (128,)
    assert "backbone.layer3.22.conv2.fc2.bias" in s101 and "backbone.layer3.23.conv1.weight" not in s101
    s101.update({k: v for k, v in state.items() if k.startswith("heads.")})
    torch.save({"model": s101}, tmp_path / "sbs_S101.pth")
    loaded = load_inference_model(load_config(None, OPTS), tmp_path / "sbs_S101.pth")
    assert loaded.cfg.MODEL.NAME == "fastreid_resnest101"


# --------------------------------------------------------------------------------------------
# fast-reid's MGN forward, over the file's tensors
# --------------------------------------------------------------------------------------------


def _fastreid_resnet(s: dict, renames: dict[str, str]) -> nn.Module:
    """fast-reid's ResNet-50-IBN (strongreid's fastreid_resnet50_ibn, checked against fast-reid's
    in test_peer_checkpoints.py) with the MGN file's tensors under `renames` (file -> ResNet)."""
    net = create_backbone("fastreid_resnet50_ibn", 1).eval()
    own = net.state_dict()
    for src, dst in renames.items():
        own.update({dst + k[len(src):]: v for k, v in s.items() if k.startswith(src)})
    net.load_state_dict(own)
    return net


def fastreid_mgn(x: torch.Tensor, s: dict) -> torch.Tensor:
    # backbone = Sequential(conv1, bn1, relu, maxpool, layer1, layer2, layer3[0])
    net = _fastreid_resnet(s, {"backbone.0.": "conv1.", "backbone.1.": "bn1.", "backbone.4.": "layer1.",
                               "backbone.5.": "layer2.", "backbone.6.": "layer3.0."})
    shared = net.layer3[0](net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))
    maps = {}
    for b in ("b1", "b2", "b3"):  # each: its own layer3[1:] (b*.0) and layer4 (b*.1)
        net = _fastreid_resnet(s, {**{f"{b}.0.{i}.": f"layer3.{i + 1}." for i in range(5)}, f"{b}.1.": "layer4."})
        maps[b] = net.layer4(net.layer3[1:](shared))
    b21, b22 = torch.chunk(maps["b2"], 2, dim=2)
    b31, b32, b33 = torch.chunk(maps["b3"], 3, dim=2)
    parts = {"b1_head": maps["b1"], "b2_head": maps["b2"], "b3_head": maps["b3"], "b21_head": b21,
             "b22_head": b22, "b31_head": b31, "b32_head": b32, "b33_head": b33}
    feats = []
    for head in MGN_HEADS:  # fast-reid's concatenation order
        p = s[f"{head}.pool_layer.p"]
        pooled = parts[head].clamp(min=1e-6).pow(p).mean((2, 3), keepdim=True).pow(1.0 / p)
        reduced = F.conv2d(pooled, s[f"{head}.bottleneck.0.weight"])
        feats.append(_bn(reduced, s, f"{head}.bottleneck.1.").flatten(1))
    return torch.cat(feats, dim=1)


def _fastreid_mgn_file(seed: int = 7, num_classes: int = 9) -> dict[str, torch.Tensor]:
    model = HEADS.get("mgn")(create_backbone("fastreid_resnet50_ibn", 1), num_classes).eval()
    own = _randomise(model, seed)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in own.items():
        if key.endswith(".pool_layer.p"):
            t = 2.0 + 2.0 * torch.rand(1, generator=g)
        state[key.replace(".classifier.weight", ".weight")] = t
    return state


def test_fastreid_mgn_r50_ibn_file_loads_and_computes_fastreids_features(tmp_path):
    state = _fastreid_mgn_file()
    for key, shape in FASTREID_MGN_R50_IBN.items():
        assert tuple(state[key].shape) == shape, key
    # R50: 5 more blocks of layer3 and layer4's 3 in each branch; eight heads of p, conv, BN, weight.
    assert {k.split(".")[0] for k in state} == {"backbone", "b1", "b2", "b3", *MGN_HEADS}
    assert {int(k.split(".")[2]) for k in state if k.startswith("b2.0.")} == set(range(5))
    path = tmp_path / "market_mgn_R50-ibn.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}}, path)
    assert detect_format(torch.load(path, weights_only=True)) == "fastreid"
    loaded = load_inference_model(load_config(None, OPTS), path)
    c = loaded.cfg
    assert (c.MODEL.NAME, c.MODEL.HEAD, c.MODEL.POOLING, c.MODEL.MGN_EMBEDDING_DIM) == (
        "fastreid_resnet50_ibn", "mgn", "gem", 256)
    assert (list(c.INPUT.SIZE_TEST), c.INPUT.INTERPOLATION) == ([384, 128], "bicubic")
    assert loaded.model.feat_dim == 2048 and loaded.warnings == ()
    with torch.no_grad():
        expected = fastreid_mgn(X16_MGN, state)
        got = loaded.model(X16_MGN)
    assert got.shape == (16, 2048)
    assert _cosines(got, expected).min() >= 0.9999
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


def test_mgn_files_strongreid_does_not_build_are_refused_by_name(tmp_path):
    state = _fastreid_mgn_file(seed=8)
    cfg = load_config(None, OPTS)
    old = {k.replace("b1_head.bottleneck.", "b1_pool.1."): v for k, v in state.items()}
    torch.save(old, tmp_path / "v0.pth")
    with pytest.raises(CheckpointError, match=r"v0\.x MGN checkpoint \(b1_pool"):
        load_inference_model(cfg, tmp_path / "v0.pth")
    no_head = {k: v for k, v in state.items() if not k.startswith("b32_head.")}
    torch.save(no_head, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"MGN\(R50-ibn\) checkpoint without .* b32_head"):
        load_inference_model(cfg, tmp_path / "partial.pth")
    extra = {**state, "b1_head.extra": torch.zeros(2)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"fast-reid MGN\(R50-ibn\) checkpoint.*1 unexpected \(b1_head.extra\)"):
        load_inference_model(cfg, tmp_path / "extra.pth")
    with pytest.raises(ConfigError, match="cuts a ResNet after layer3's first block.*osnet_x0_25"):
        HEADS.get("mgn")(create_backbone("osnet_x0_25", 1), 3)
    model = HEADS.get("mgn")(create_backbone("fastreid_resnet50", 1), 3).eval()
    with pytest.raises(ConfigError, match="4 high, which torch.chunk splits into 2"):
        model(torch.zeros(1, 3, 64, 32))


# --------------------------------------------------------------------------------------------
# Every command: test, extract, FeatureExtractor, gallery ingest, export --target boxmot
# --------------------------------------------------------------------------------------------

needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="the deploy extra (onnx, onnxruntime) is not installed: pip install '.[deploy]'",
)


@needs_onnx
@pytest.mark.parametrize("kind", ["mgn", "bot_s50"])
def test_fastreid_file_through_every_command(kind, few_people, tmp_path, capsys):
    import onnxruntime as ort

    state = _fastreid_mgn_file(seed=9) if kind == "mgn" else _fastreid_s50_file(seed=5)
    state["pixel_mean"] = torch.tensor([127.5, 114.75, 102.0]).view(1, 3, 1, 1)
    state["pixel_std"] = torch.tensor([51.0, 63.75, 76.5]).view(1, 3, 1, 1)
    weights = tmp_path / f"{kind}.pth"
    torch.save({"model": state}, weights)
    size = [384, 128] if kind == "mgn" else [256, 128]
    opts = [*OPTS, "DATASETS.NAMES", "synthetic", "DATASETS.ROOT_DIR", str(few_people),
            "INPUT.SIZE_TEST", "[64, 32]", "DATALOADER.NUM_WORKERS", "0", "TEST.WEIGHT", str(weights)]

    assert main(["test", *opts, "OUTPUT_DIR", str(tmp_path / "test")]) == 0
    results = json.loads((tmp_path / "test" / "results.json").read_text())
    assert 0 <= results["mAP"] <= 1 and results["num_query"] > 0

    images = sorted((few_people / "synthetic" / "query").glob("*.jpg"))[:3]
    assert main(["extract", "--images", str(images[0].parent), "--out", str(tmp_path / "f.npz"), *opts]) == 0
    extracted = np.load(tmp_path / "f.npz")
    extractor = FeatureExtractor(load_config(None, opts), weights, device="cpu")
    assert extractor.checkpoint_format == "fastreid" and extractor.feat_dim == 2048
    direct = extractor([np.asarray(Image.open(p).convert("RGB")) for p in images]).numpy()
    names = [str(n) for n in extracted["paths"]]
    rows = [next(i for i, n in enumerate(names) if n.endswith(p.name)) for p in images]
    np.testing.assert_allclose(extracted["feats"][rows], direct, atol=1e-5)

    gallery = tmp_path / "gallery.db"
    ingest = ["gallery", "ingest", "--gallery", str(gallery), "--model", str(weights), "--crops",
              str(images[0].parent), "--device", "cpu"]
    assert main(ingest) == 0
    assert f"{len(list(images[0].parent.glob('*.jpg')))} crops added" in capsys.readouterr().out

    onnx_path = tmp_path / "reid.onnx"
    assert main(["export", "--target", "boxmot", "--out", str(onnx_path), "--no-preprocessing-check", *opts]) == 0
    sidecar = json.loads((tmp_path / "reid.onnx.metadata.json").read_text())
    assert sidecar["model_kwargs"] == {"img_size": size}
    # BoxMOT feeds ImageNet-normalised crops; the graph folds the file's own statistics in.
    pixels = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    imagenet = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    own = (pixels - torch.tensor([0.5, 0.45, 0.4]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        # The exported graph ends with the test feature's L2 normalisation (TEST.FEAT_NORM yes).
        want = F.normalize(load_inference_model(load_config(None, opts), weights).model(own), dim=1).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: imagenet.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4


# --------------------------------------------------------------------------------------------
# MGN as a strongreid model: preset, ImageNet start, frozen stages, training
# --------------------------------------------------------------------------------------------

MGN_TINY = {"MODEL.HEAD": "mgn", "INPUT.SIZE_TRAIN": "[96, 32]", "INPUT.SIZE_TEST": "[96, 32]",
            "MODEL.IF_WITH_CENTER": "no", "MODEL.METRIC_LOSS_TYPE": "triplet", "SOLVER.MAX_EPOCHS": "1",
            "SOLVER.ID_LOSS_WEIGHT": "0.125"}


def test_mgn_preset_validates_and_its_keys_are_checked():
    from pathlib import Path

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "mgn.yml"), [])
    assert (cfg.MODEL.HEAD, cfg.MODEL.NAME, cfg.MODEL.MGN_EMBEDDING_DIM) == ("mgn", "fastreid_resnet50_ibn", 256)
    with pytest.raises(ConfigError, match="MODEL.MGN_EMBEDDING_DIM = -1"):
        load_config(None, [*OPTS, "MODEL.HEAD", "mgn", "MODEL.MGN_EMBEDDING_DIM", "-1"])
    with pytest.raises(ConfigError, match="set MODEL.NECK 'bnneck'"):
        load_config(None, [*OPTS, "MODEL.HEAD", "mgn", "MODEL.NECK", "no"])


def test_mgn_branches_start_from_the_imagenet_file_and_freeze_with_the_backbone(tmp_path):
    from strongreid.modeling import build_model
    from strongreid.solver.optimizer import param_groups

    file_net = create_backbone("resnet18", 1)
    _randomise(file_net, 11)
    torch.save(file_net.state_dict(), tmp_path / "resnet18_imagenet.pth")
    cfg = load_config(None, [*OPTS, "MODEL.HEAD", "mgn", "MODEL.PRETRAIN_CHOICE", "imagenet",
                             "MODEL.PRETRAIN_PATH", str(tmp_path / "resnet18_imagenet.pth")])
    model = build_model(cfg, 5)
    for branch in (model.b1, model.b2, model.b3):  # fast-reid copies the loaded stages into each
        torch.testing.assert_close(branch[0][0].conv1.weight, file_net.layer3[1].conv1.weight)
        torch.testing.assert_close(branch[1][1].bn2.running_var, file_net.layer4[1].bn2.running_var)
    assert model.b1[1][0].conv1.stride == (1, 1) and model.b2[1][0].downsample[0].stride == (1, 1)
    groups = param_groups(model, 1e-3, 5e-4, 1.0, 5e-4, split_backbone=True)
    frozen = {id(p) for g in groups if g["backbone"] for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (id(p) in frozen) == name.startswith(("backbone.", "b1.", "b2.", "b3.")), name


def test_mgn_trains_and_tests_from_its_checkpoint(tiny_synthetic_root, tmp_path):
    from _train_utils import tiny_train_opts

    out = tmp_path / "mgn"
    opts = tiny_train_opts(tiny_synthetic_root, out, **MGN_TINY)
    assert main(["train", *opts]) == 0
    trained = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite([r["loss"] for r in rows if r["type"] == "train"]).all()
    # strongreid's own MGN checkpoint (`b1_head.classifier.weight`) is not taken for fast-reid's.
    assert detect_format(torch.load(out / "best.pt", weights_only=True)) == "strongreid"
    assert main(["test", *opts, "TEST.WEIGHT", str(out / "best.pt"), "OUTPUT_DIR", str(tmp_path / "t")]) == 0
    tested = json.loads((tmp_path / "t" / "results.json").read_text())
    assert tested["mAP"] == pytest.approx(trained["mAP"], abs=1e-6)
