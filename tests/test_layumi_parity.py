"""layumi's files give layumi's features and numbers when used as docs/coming-from-layumi.md says.

For ft_net (stride 1 and 2, IBN-a), ft_net_dense and PCB, a checkpoint with layumi's key names is
written with random weights beside a small layumi `pytorch/` folder. The reference is layumi's
test.py + evaluate_gpu.py (at 82ff40f) restated here: Resize((h, w), bicubic), ToTensor,
ImageNet Normalize; the image and its fliplr, each at every --ms scale (the scale loop resizes
the previous input again, with bicubic F.interpolate) summed into one feature, then L2 (PCB:
each 2048-d part over its norm times sqrt(6)); ranking by the cosine score, junk = same label and
camera or label -1, trapezoid AP, queries without a match counted in the mean. strongreid is run
only with the keys the doc gives: FeatureExtractor with `TEST.FLIP_AUG True` (and
`TEST.MULTI_SCALE [1.0,1.1]`), `strongreid test ... DATASETS.NAMES layumi TEST.FLIP_AUG True
TEST.AP trapezoid TEST.UNMATCHED fail`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from test_layumi_checkpoints import RefDense, RefFtNet, RefPCB, class_block, write_layumi
from torch import nn

from strongreid import FeatureExtractor
from strongreid.cli import main
from strongreid.config import load_config
from strongreid.modeling.backbones import create_backbone
from strongreid.modeling.loading import load_inference_model

SPEED = ["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"]  # nothing that changes features
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# layumi folder: (split, label folder, file name); -1 is junk, 0000 a distractor.
FILES = [
    ("query", "0001", "0001_c1s1_000151_01.jpg"), ("query", "0002", "0002_c2s1_000301_01.jpg"),
    ("query", "0003", "0003_c1s1_000451_01.jpg"),
    ("gallery", "0001", "0001_c2s1_000201_02.jpg"), ("gallery", "0001", "0001_c1s1_000251_02.jpg"),
    ("gallery", "0002", "0002_c3s1_000351_02.jpg"), ("gallery", "0003", "0003_c1s1_000551_02.jpg"),
    ("gallery", "0000", "0000_c2s1_000651_02.jpg"), ("gallery", "-1", "-1_c3s1_000751_02.jpg"),
]


class RefIbn(nn.Module):
    """ft_net --ibn: the IBN-a ResNet-50 of XingangPan's hub (same key names) with its fc."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.model = create_backbone("resnet50_ibn_a", 2)
        self.model.fc = nn.Linear(2048, 1000)
        if stride == 1:  # layumi's ft_net(stride=1) edits the first layer4 block
            self.model.layer4[0].downsample[0].stride = (1, 1)
            self.model.layer4[0].conv2.stride = (1, 1)
        self.classifier = class_block(2048, 512, 7)


def layumi_output(name: str, ref: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The test-mode model's output in test.py: the ClassBlock embedding, or PCB_test's n x C x 6."""
    if name == "ft_net_dense":
        return ref.classifier.add_block(ref.model.features(x).mean(dim=(2, 3)))
    m = ref.model
    x = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
    if name == "PCB":
        return F.adaptive_avg_pool2d(x, (6, 1)).view(x.size(0), x.size(1), 6)
    return ref.classifier.add_block(x.mean(dim=(2, 3)))


def layumi_features(name: str, ref: nn.Module, paths: list[Path], ms: list[float]) -> torch.Tensor:
    """test.py's extract_feature on `paths` (its transform, flip loop, --ms loop and norm)."""
    size = (384, 192) if name == "PCB" else (256, 128)
    transform = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize(MEAN, STD)])
    img = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    scales = [math.sqrt(s) for s in ms]
    ff = 0
    with torch.no_grad():
        for i in range(2):
            if i == 1:
                img = img.flip(3)
            input_img = img
            for scale in scales:
                if scale != 1:
                    input_img = F.interpolate(input_img, scale_factor=scale, mode="bicubic",
                                              align_corners=False)
                ff = ff + layumi_output(name, ref.eval(), input_img)
    if name == "PCB":
        ff = ff / (ff.norm(p=2, dim=1, keepdim=True) * np.sqrt(6))
        return ff.reshape(ff.size(0), -1)
    return ff / ff.norm(p=2, dim=1, keepdim=True)


def layumi_label_cam(path: Path) -> tuple[int, int]:
    """test.py's get_id: label from the first 4 characters (-1 for '-1'), camera the digit after 'c'."""
    label = path.name[0:4]
    return (-1 if label[0:2] == "-1" else int(label)), int(path.name.split("c")[1][0])


def layumi_map(qf, ql, qc, gf, gl, gc) -> tuple[float, float]:
    """evaluate_gpu.py: cosine ranking, junk removed, trapezoid AP; (Rank@1, mAP) over all queries."""
    cmc1, ap_sum = 0.0, 0.0
    for i in range(len(ql)):
        index = np.argsort((gf @ qf[i]).numpy())[::-1]
        good = np.setdiff1d(np.argwhere(gl == ql[i]), np.argwhere(gc == qc[i]), assume_unique=True)
        junk = np.append(np.intersect1d(np.argwhere(gl == ql[i]), np.argwhere(gc == qc[i])),
                         np.argwhere(gl == -1))
        if good.size == 0:
            continue
        index = index[np.isin(index, junk, invert=True)]
        rows = np.argwhere(np.isin(index, good)).flatten()
        cmc1 += float(rows[0] == 0)
        for j, r in enumerate(rows):
            old = j / r if r != 0 else 1.0
            ap_sum += ((j + 1) / (r + 1) + old) / 2 / len(good)
    return cmc1 / len(ql), ap_sum / len(ql)


def build(name: str, stride: int) -> nn.Module:
    torch.manual_seed(stride + len(name))
    return {"ft_net": lambda: RefFtNet(stride), "ft_net_ibn": lambda: RefIbn(stride),
            "ft_net_dense": RefDense, "PCB": RefPCB}[name]()


def write_trained_like(path: Path, name: str, ref: nn.Module, paths: list[Path],
                       stride: int | None) -> Path:
    """Save `ref` as layumi's train.py does (state dict, opts.yaml) after giving every BatchNorm
    the running statistics of the images themselves: with PyTorch's random init and such
    statistics, different images get clearly different features, as a trained model's do."""
    size = (384, 192) if name == "PCB" else (256, 128)
    transform = T.Compose([T.Resize(size), T.ToTensor(), T.Normalize(MEAN, STD)])
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # the plain mean over what it sees
    with torch.no_grad():
        layumi_output(name, ref.train(), batch)
    ref.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref.state_dict(), path)
    if stride is not None:
        (path.parent / "opts.yaml").write_text(f"stride: {stride}\nlinear_num: 512\ndroprate: 0.5\n")
    return path


@pytest.fixture(scope="module")
def layumi_data(tmp_path_factory) -> Path:
    """layumi's `Market/pytorch/{query,gallery}/<label>/` with images of 128 x 64 (Market's size):
    one smooth pattern per identity, noise per image, so identities rank above each other."""
    root = tmp_path_factory.mktemp("layumi")
    rng = np.random.default_rng(0)
    patterns = {}
    for split, label, name in FILES:
        base = patterns.setdefault(label, rng.uniform(0, 255, (8, 4, 3)))
        small = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        pixels = np.asarray(Image.fromarray(small).resize((64, 128), Image.BILINEAR))
        noisy = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
        (root / "Market" / "pytorch" / split / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(root / "Market" / "pytorch" / split / label / name, quality=90)
    return root


CASES = [("ft_net", 1), ("ft_net", 2), ("ft_net_ibn", 2), ("ft_net_dense", 2), ("PCB", 1)]


@pytest.mark.parametrize(("name", "stride"), CASES)
def test_features_and_map_equal_layumis_with_the_documented_keys(layumi_data, tmp_path, capsys,
                                                                  name, stride):
    data = layumi_data / "Market" / "pytorch"
    paths = sorted(data.glob("*/*/*.jpg"))
    ref = build(name, stride)
    weights = write_trained_like(tmp_path / "model" / name / "net_last.pth", name, ref, paths,
                                 None if name == "PCB" else stride)
    want = {}
    for ms in ([1.0], [1.0, 1.1]):
        want[len(ms)] = layumi_features(name, ref, paths, ms)
        fe = FeatureExtractor(None, weights, device="cpu",
                              opts=["TEST.FLIP_AUG", "True", "TEST.MULTI_SCALE", str(ms)])
        got = fe([str(p) for p in paths])
        cosine = F.cosine_similarity(got, want[len(ms)], dim=1)
        assert cosine.min() >= 0.99999, (name, stride, ms, cosine.min())
    # `strongreid test` with the documented keys prints layumi's numbers (--ms 1,1.1 here).
    out = tmp_path / "run"
    assert main(["test", "TEST.WEIGHT", str(weights), "DATASETS.NAMES", "layumi", "DATASETS.ROOT_DIR",
                 str(layumi_data), "TEST.FLIP_AUG", "True", "TEST.AP", "trapezoid", "TEST.UNMATCHED",
                 "fail", "TEST.MULTI_SCALE", "[1.0,1.1]", "OUTPUT_DIR", str(out), *SPEED]) == 0
    printed = capsys.readouterr().out
    split = {s: [i for i, p in enumerate(paths) if p.parent.parent.name == s] for s in ("query", "gallery")}
    ids = {s: np.array([layumi_label_cam(paths[i]) for i in split[s]]) for s in split}
    feats = {s: want[2][split[s]] for s in split}
    rank1, m_ap = layumi_map(feats["query"], *ids["query"].T, feats["gallery"], *ids["gallery"].T)
    res = json.loads((out / "results.json").read_text())
    assert res["mAP"] == pytest.approx(m_ap, abs=1e-9) and res["rank1"] == pytest.approx(rank1, abs=1e-9)
    assert f"| plain | {100 * m_ap:.1f} |" in printed
    assert res["interpolation"] == "bicubic" and res["precision"] == "float32" and res["warnings"] == []
    assert 0.0 < m_ap < 1.0  # the case is not degenerate


def test_stride_without_opts_yaml_warns_with_the_key_and_the_key_works(tmp_path):
    ref = RefFtNet(1)
    path = write_layumi(tmp_path / "m" / "net_last.pth", ref)  # no opts.yaml: stride unknown
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        want = ref.eval().test_feature(x)
    guessed = load_inference_model(load_config(None, SPEED), path)
    assert guessed.cfg.MODEL.LAST_STRIDE == 2 and len(guessed.warnings) == 1
    assert "set MODEL.LAST_STRIDE 1" in guessed.warnings[0] and "net_last.pth" in guessed.warnings[0]
    told = load_inference_model(load_config(None, [*SPEED, "MODEL.LAST_STRIDE", "1"]), path)
    assert told.cfg.MODEL.LAST_STRIDE == 1 and told.warnings == ()
    with torch.no_grad():
        torch.testing.assert_close(told.model(x), want, rtol=1e-4, atol=1e-5)
        wrong = F.cosine_similarity(guessed.model(x), want, dim=1)
    assert wrong.max() < 0.9999  # the guess gives other features: hence the warning
    # An opts.yaml beside the file wins over the config, as layumi's test.py reads it.
    (tmp_path / "m" / "opts.yaml").write_text("stride: 1\n")
    assert load_inference_model(load_config(None, [*SPEED, "MODEL.LAST_STRIDE", "2"]), path).cfg.MODEL.LAST_STRIDE == 1


def test_stride_warning_reaches_results_json(layumi_data, tmp_path, capsys):
    weights = write_layumi(tmp_path / "m" / "net_last.pth", RefFtNet(2))
    out = tmp_path / "run"
    assert main(["test", "TEST.WEIGHT", str(weights), "DATASETS.NAMES", "layumi", "DATASETS.ROOT_DIR",
                 str(layumi_data), "OUTPUT_DIR", str(out), *SPEED]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["warnings"]) == 1 and "MODEL.LAST_STRIDE 1" in res["warnings"][0]
    assert "warning: " in capsys.readouterr().out
