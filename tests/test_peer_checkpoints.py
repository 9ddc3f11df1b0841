"""Checkpoints of the peers: fast-reid, torchreid and reid-strong-baseline files, built here with
their real key names, nesting and shapes, loaded by `test` / FeatureExtractor's one loader."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _train_utils import tiny_train_opts

from strongreid import FeatureExtractor
from strongreid.cli import main
from strongreid.config import load_config
from strongreid.errors import CheckpointError
from strongreid.modeling import create_backbone
from strongreid.modeling.formats import detect_format
from strongreid.modeling.loading import load_inference_model

OPTS = ["MODEL.DEVICE", "cpu", "MODEL.NAME", "resnet18", "MODEL.PRETRAIN_CHOICE", "none",
        "MODEL.AMP", "off", "MODEL.CHANNELS_LAST", "off", "TEST.IMS_PER_BATCH", "4"]
X = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(0))

# Facts read off fast-reid's ResNet (build_resnet_backbone, 50x, WITH_IBN, WITH_NL) and
# EmbeddingHead: a few keys with their shapes, and the backbone's tensor count.
FASTREID_R50_IBN_NL = {
    "backbone.conv1.weight": (64, 3, 7, 7),
    "backbone.layer1.0.bn1.IN.weight": (32,),
    "backbone.layer1.0.bn1.BN.running_mean": (32,),
    "backbone.layer3.5.bn1.IN.bias": (128,),
    "backbone.layer4.0.bn1.running_var": (512,),
    "backbone.NL_2.0.g.weight": (1, 512, 1, 1),
    "backbone.NL_2.1.W.0.weight": (512, 1, 1, 1),
    "backbone.NL_3.2.W.1.running_var": (1024,),
    "backbone.NL_3.0.theta.bias": (1,),
    "backbone.NL_3.1.phi.weight": (1, 1024, 1, 1),
}
FASTREID_R50_IBN_NL_BACKBONE_TENSORS = 409


def _randomise(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The module's state with random norm parameters and statistics (a trained look); the
    weights keep their seeded initialisation, so deep activations stay finite."""
    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in module.state_dict().items():
        if t.is_floating_point() and t.ndim == 1:
            if key.endswith("running_var"):
                t = torch.rand(t.shape, generator=g) + 0.5
            elif key.endswith(("running_mean", "bias")):
                t = torch.randn(t.shape, generator=g) * 0.05
            else:  # norm scales
                t = torch.rand(t.shape, generator=g) + 0.5
        state[key] = t.clone()
    module.load_state_dict(state)
    return state


def _bn_eval(x: torch.Tensor, state: dict, prefix: str, eps: float = 1e-5) -> torch.Tensor:
    mean, var = state[prefix + "running_mean"], state[prefix + "running_var"]
    return (x - mean) / torch.sqrt(var + eps) * state[prefix + "weight"] + state[prefix + "bias"]


# --------------------------------------------------------------------------------------------
# torchreid
# --------------------------------------------------------------------------------------------


def _torchreid_osnet(name: str, num_classes: int = 11, fc: int = 512, seed: int = 1):
    """A torchreid OSNet state dict: backbone keys + fc.0/fc.1 + classifier (with bias)."""
    backbone = create_backbone(name, 1).eval()
    state = _randomise(backbone, seed)
    g = torch.Generator().manual_seed(seed + 1)
    c = backbone.feat_dim
    state.update({
        "fc.0.weight": torch.randn(fc, c, generator=g) * 0.05, "fc.0.bias": torch.randn(fc, generator=g) * 0.01,
        "fc.1.weight": torch.rand(fc, generator=g) + 0.5, "fc.1.bias": torch.randn(fc, generator=g) * 0.01,
        "fc.1.running_mean": torch.randn(fc, generator=g) * 0.01, "fc.1.running_var": torch.rand(fc, generator=g) + 0.5,
        "fc.1.num_batches_tracked": torch.tensor(100),
        "classifier.weight": torch.randn(num_classes, fc, generator=g), "classifier.bias": torch.zeros(num_classes),
    })

    def reference(x: torch.Tensor) -> torch.Tensor:
        # torchreid's eval forward: featuremaps -> GAP -> Linear -> BatchNorm1d -> ReLU.
        with torch.no_grad():
            v = F.adaptive_avg_pool2d(backbone(x), 1).flatten(1)
            v = F.linear(v, state["fc.0.weight"], state["fc.0.bias"])
            return torch.relu(_bn_eval(v, state, "fc.1."))

    return state, reference


def test_torchreid_training_file_module_prefix_and_nesting(tmp_path):
    state, reference = _torchreid_osnet("osnet_x0_25")
    path = tmp_path / "model.pth.tar-60"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 60, "rank1": 0.62,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    loaded = load_inference_model(load_config(None, OPTS), path)
    assert loaded.format == "torchreid"
    m = loaded.cfg.MODEL
    assert (m.NAME, m.HEAD, m.LINEAR_NUM, m.LAST_STRIDE) == ("osnet_x0_25", "torchreid", 512, 1)
    assert list(loaded.cfg.INPUT.SIZE_TEST) == [256, 128]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), reference(X))


@pytest.mark.parametrize(("name", "stem"), [("osnet_ain_x0_25", "IN"), ("osnet_ibn_x1_0", "IN"),
                                            ("osnet_x0_5", "BN")])
def test_torchreid_model_zoo_osnets(tmp_path, name, stem):
    # Model-zoo files are bare state dicts, e.g. osnet_ain_x0_25_msmt17_256x128_...pth.
    state, reference = _torchreid_osnet(name, num_classes=7)
    path = tmp_path / f"{name}_market_256x128.pth"
    torch.save(state, path)
    loaded = load_inference_model(load_config(None, OPTS), path)
    assert loaded.cfg.MODEL.NAME == name
    assert isinstance(loaded.model.backbone.conv1.bn, nn.InstanceNorm2d if stem == "IN" else nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), reference(X))


def test_torchreid_resnet50_fc512_and_plain_resnet(tmp_path):
    # resnet50_fc512: last stride 1 and a 512-d fc; the plain ResNets: stride 2, no fc, the
    # pooled 2048 (512 for ResNet-18) map is the feature.
    backbone = create_backbone("resnet50", 1)
    state = _randomise(backbone, 3)
    state.update({"fc.0.weight": torch.randn(512, 2048) * 0.02, "fc.0.bias": torch.zeros(512),
                  "fc.1.weight": torch.ones(512), "fc.1.bias": torch.zeros(512),
                  "fc.1.running_mean": torch.zeros(512), "fc.1.running_var": torch.ones(512),
                  "fc.1.num_batches_tracked": torch.tensor(0),
                  "classifier.weight": torch.randn(751, 512), "classifier.bias": torch.zeros(751)})
    torch.save({"state_dict": state}, tmp_path / "resnet50_fc512.pth.tar")
    loaded = load_inference_model(load_config(None, OPTS), tmp_path / "resnet50_fc512.pth.tar")
    assert (loaded.cfg.MODEL.NAME, loaded.cfg.MODEL.LAST_STRIDE, loaded.cfg.MODEL.LINEAR_NUM) == ("resnet50", 1, 512)
    assert loaded.model.backbone.layer4[0].conv2.stride == (1, 1)

    small = create_backbone("resnet18", 2)
    state = _randomise(small, 4)
    state.update({"classifier.weight": torch.randn(5, 512), "classifier.bias": torch.zeros(5)})
    torch.save(state, tmp_path / "resnet18_market.pth")
    loaded = load_inference_model(load_config(None, OPTS), tmp_path / "resnet18_market.pth")
    assert (loaded.cfg.MODEL.LAST_STRIDE, loaded.cfg.MODEL.LINEAR_NUM, loaded.model.fc) == (2, 0, None)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(X), F.adaptive_avg_pool2d(small.eval()(X), 1).flatten(1))


def test_torchreid_file_through_the_cli_and_the_extractor(tiny_synthetic_root, tmp_path, capsys):
    state, reference = _torchreid_osnet("osnet_x0_25", num_classes=751)
    path = tmp_path / "osnet_x0_25_market.pth"
    torch.save(state, path)
    out = tmp_path / "test"
    # The user's config says resnet18 at 64x32: the file's format decides the model and the
    # input size (256x128, torchreid's).
    assert main(["test", *tiny_train_opts(tiny_synthetic_root, out, **{"TEST.WEIGHT": path})]) == 0
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["mAP"] <= 1 and results["num_query"] > 0
    assert "torchreid osnet_x0_25" in (out / "log.txt").read_text()

    extractor = FeatureExtractor(load_config(None, OPTS), path, device="cpu")
    assert extractor.checkpoint_format == "torchreid"
    image = np.full((256, 128, 3), 100, dtype=np.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    by_hand = (torch.full((1, 3, 256, 128), 100 / 255) - mean) / std
    expected = F.normalize(reference(by_hand), dim=1)
    torch.testing.assert_close(extractor([image]), expected, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# fast-reid
# --------------------------------------------------------------------------------------------


def _fastreid_model(backbone_name: str, seed: int, num_classes: int = 9):
    backbone = create_backbone(backbone_name, 1).eval()
    bstate = _randomise(backbone, seed)
    g = torch.Generator().manual_seed(seed + 1)
    neck = {"weight": torch.rand(2048, generator=g) + 0.5, "bias": torch.zeros(2048),
            "running_mean": torch.randn(2048, generator=g) * 0.1,
            "running_var": torch.rand(2048, generator=g) + 0.5, "num_batches_tracked": torch.tensor(7)}
    state = {f"backbone.{k}": v for k, v in bstate.items()}
    state.update({f"heads.bottleneck.0.{k}": v for k, v in neck.items()})
    return backbone, state, neck, torch.randn(num_classes, 2048, generator=g)


def test_fastreid_sbs_r50_ibn(tmp_path):
    # v1.2+ file: `heads.weight` classifier, learned GeM p, no pixel buffers (non-persistent).
    backbone, state, neck, weight = _fastreid_model("fastreid_resnet50_ibn_nl", 5)
    for key, shape in FASTREID_R50_IBN_NL.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(k.startswith("backbone.") for k in state) == FASTREID_R50_IBN_NL_BACKBONE_TENSORS
    state["heads.pool_layer.p"] = torch.tensor([3.5])
    state["heads.weight"] = weight
    path = tmp_path / "market_sbs_R50-ibn.pth"
    torch.save({"model": state, "optimizer": {}, "scheduler": {}, "iteration": 12000}, path)
    assert detect_format(torch.load(path, weights_only=True)) == "fastreid"
    loaded = load_inference_model(load_config(None, OPTS), path)
    c = loaded.cfg
    assert (c.MODEL.NAME, c.MODEL.POOLING, c.MODEL.GEM_P, c.MODEL.LAST_STRIDE) == (
        "fastreid_resnet50_ibn_nl", "gem", 3.5, 1)
    assert list(c.INPUT.SIZE_TEST) == [384, 128] and list(c.INPUT.PIXEL_MEAN) == [0.485, 0.456, 0.406]
    with torch.no_grad():
        fmap = backbone(X).clamp(min=1e-6)
        pooled = F.adaptive_avg_pool2d(fmap.pow(3.5), 1).flatten(1).pow(1 / 3.5)
        expected = _bn_eval(pooled, {k: v for k, v in neck.items()}, "")
        torch.testing.assert_close(loaded.model(X), expected, rtol=1e-4, atol=1e-5)


def test_fastreid_bot_r50_old_layout_with_pixel_buffers(tmp_path):
    # The v0.1.1 model zoo: `heads.classifier.weight`, persistent pixel_mean/std in 0-255 units.
    backbone, state, neck, weight = _fastreid_model("fastreid_resnet50", 6)
    state["heads.classifier.weight"] = weight
    state["pixel_mean"] = torch.tensor([127.5, 114.75, 102.0]).view(1, 3, 1, 1)
    state["pixel_std"] = torch.tensor([51.0, 63.75, 76.5]).view(1, 3, 1, 1)
    path = tmp_path / "market_bot_R50.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = load_inference_model(load_config(None, OPTS), path)
    c = loaded.cfg
    assert (c.MODEL.NAME, c.MODEL.POOLING, list(c.INPUT.SIZE_TEST)) == ("fastreid_resnet50", "avg", [256, 128])
    torch.testing.assert_close(torch.tensor(list(c.INPUT.PIXEL_MEAN)), torch.tensor([0.5, 0.45, 0.4]), rtol=0, atol=1e-7)
    torch.testing.assert_close(torch.tensor(list(c.INPUT.PIXEL_STD)), torch.tensor([0.2, 0.25, 0.3]), rtol=0, atol=1e-7)
    assert torch.equal(loaded.model.classifier.weight, weight)
    with torch.no_grad():
        expected = _bn_eval(F.adaptive_avg_pool2d(backbone(X), 1).flatten(1), neck, "")
        torch.testing.assert_close(loaded.model(X), expected, rtol=1e-4, atol=1e-5)

    # A tensor of no known part is reported by name, not dropped.
    state["heads.extra.weight"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"fast-reid checkpoint of BoT\(R50\).*heads.extra.weight"):
        load_inference_model(load_config(None, OPTS), tmp_path / "odd.pth")


def test_fastreid_agw_and_a_mismatch_naming_both_architectures(tmp_path):
    backbone, state, neck, weight = _fastreid_model("fastreid_resnet50_nl", 8)
    state["heads.weight"] = weight
    torch.save({"model": state}, tmp_path / "market_agw_R50.pth")
    loaded = load_inference_model(load_config(None, OPTS), tmp_path / "market_agw_R50.pth")
    assert (loaded.cfg.MODEL.POOLING, loaded.cfg.MODEL.GEM_P) == ("gem", 3.0)
    # R101's third stage has 9 non-local blocks; a file with 3 of them is another network.
    dropped = {k: v for k, v in state.items() if not k.startswith("backbone.NL_3.2.")}
    torch.save({"model": dropped}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"fast-reid AGW\(R50\) checkpoint.*fastreid_resnet50_nl.*missing"):
        load_inference_model(load_config(None, OPTS), tmp_path / "broken.pth")


def test_explicit_format_that_does_not_fit(tmp_path):
    state, _ = _torchreid_osnet("osnet_x0_25")
    torch.save(state, tmp_path / "osnet.pth")
    with pytest.raises(CheckpointError, match="not a fast-reid Baseline checkpoint"):
        load_inference_model(load_config(None, [*OPTS, "MODEL.CHECKPOINT_FORMAT", "fastreid"]),
                             tmp_path / "osnet.pth")
    explicit = load_inference_model(load_config(None, [*OPTS, "MODEL.CHECKPOINT_FORMAT", "torchreid"]),
                                    tmp_path / "osnet.pth")
    assert explicit.format == "torchreid"


# --------------------------------------------------------------------------------------------
# reid-strong-baseline
# --------------------------------------------------------------------------------------------


def test_rsb_state_dict_runs_without_the_stem_relu(tmp_path):
    backbone = create_backbone("resnet18", 1).eval()
    bstate = _randomise(backbone, 9)
    g = torch.Generator().manual_seed(10)
    neck = {"weight": torch.rand(512, generator=g) + 0.5, "bias": torch.zeros(512),
            "running_mean": torch.randn(512, generator=g) * 0.1, "running_var": torch.rand(512, generator=g) + 0.5,
            "num_batches_tracked": torch.tensor(1)}
    state = {f"base.{k}": v for k, v in bstate.items()}
    state.update({f"bottleneck.{k}": v for k, v in neck.items()})
    state["classifier.weight"] = torch.randn(6, 512, generator=g)
    path = tmp_path / "resnet18_model_120_state.pth"
    torch.save(state, path)
    loaded = load_inference_model(load_config(None, OPTS), path)
    assert (loaded.format, loaded.cfg.MODEL.NAME) == ("reid-strong-baseline", "rsb_resnet18")
    with torch.no_grad():
        b = backbone
        fmap = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.bn1(b.conv1(X)))))))  # no ReLU
        expected = _bn_eval(F.adaptive_avg_pool2d(fmap, 1).flatten(1), neck, "")
        torch.testing.assert_close(loaded.model(X), expected, rtol=1e-4, atol=1e-5)


def test_rsb_pickled_whole_model_is_one_clear_message(tmp_path, monkeypatch, capsys):
    # What ignite 0.1.2 wrote: torch.save(model) of the original's modeling.baseline.Baseline.
    package = tmp_path / "rsb" / "modeling"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "baseline.py").write_text(
        "import torch.nn as nn\n\nclass Baseline(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.classifier = nn.Linear(4, 2, bias=False)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "rsb"))
    from modeling.baseline import Baseline

    path = tmp_path / "resnet50_model_120.pth"
    torch.save(Baseline(), path)
    for name in [n for n in sys.modules if n == "modeling" or n.startswith("modeling.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(CheckpointError) as info:
        load_inference_model(load_config(None, OPTS), path)
    message = str(info.value)
    assert "whole pickled reid-strong-baseline model (modeling.baseline.Baseline" in message
    assert "weights_only=False" in message and "state_dict()" in message and "docs/model-zoo.md" in message
    # Through the CLI as a user meets it (export reads the weights first: no dataset involved).
    assert main(["export", *OPTS, "TEST.WEIGHT", str(path), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("error:") == 1 and "Traceback" not in err
    assert "whole pickled reid-strong-baseline model (modeling.baseline.Baseline" in err
