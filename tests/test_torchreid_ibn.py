"""torchreid's resnet50_ibn_a / resnet50_ibn_b files: the key names and shapes of its
models/resnet_ibn_a.py and resnet_ibn_b.py, loaded without a format key, against torchreid's eval
forward written out below (featuremaps -> global average pool; no fc in either model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _peer_e2e import OPTS, cosines, through_every_entry
from _train_utils import tiny_train_opts
from PIL import Image

from strongreid.config import load_config
from strongreid.errors import CheckpointError
from strongreid.modeling.formats import detect_format
from strongreid.modeling.loading import load_inference_model


def _norm(name: str, width: int, instance: bool) -> dict[str, tuple[int, ...]]:
    # InstanceNorm2d(affine=True) keeps no running statistics; BatchNorm2d does.
    leaves = ("weight", "bias") if instance else ("weight", "bias", "running_mean", "running_var")
    shapes = {f"{name}.{leaf}": (width,) for leaf in leaves}
    if not instance:
        shapes[f"{name}.num_batches_tracked"] = ()
    return shapes


def torchreid_ibn_shapes(variant: str, classes: int) -> dict[str, tuple[int, ...]]:
    """torchreid's ResNet(Bottleneck, [3, 4, 6, 3]) state dict for resnet50_ibn_<variant>.

    IBN-a: bn1 of every block of layer1-3 is IBN (IN on planes // 2, BN on the rest). IBN-b: the
    stem's bn1 is an InstanceNorm2d and the last block of layer1 and layer2 has `IN`."""
    shapes = {"conv1.weight": (64, 3, 7, 7), **_norm("bn1", 64, variant == "b")}
    inplanes = 64
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
        for i in range(blocks):
            p = f"layer{layer}.{i}."
            shapes[p + "conv1.weight"] = (planes, inplanes if i == 0 else 4 * planes, 1, 1)
            if variant == "a" and planes != 512:
                shapes.update({**_norm(p + "bn1.IN", planes // 2, True),
                               **_norm(p + "bn1.BN", planes - planes // 2, False)})
            else:
                shapes.update(_norm(p + "bn1", planes, False))
            shapes[p + "conv2.weight"] = (planes, planes, 3, 3)
            shapes[p + "conv3.weight"] = (4 * planes, planes, 1, 1)
            shapes.update({**_norm(p + "bn2", planes, False), **_norm(p + "bn3", 4 * planes, False)})
            if i == 0:
                shapes[p + "downsample.0.weight"] = (4 * planes, inplanes, 1, 1)
                shapes.update(_norm(p + "downsample.1", 4 * planes, False))
            if variant == "b" and layer in (1, 2) and i == blocks - 1:
                shapes.update(_norm(p + "IN", 4 * planes, True))
        inplanes = 4 * planes
    shapes["classifier.weight"], shapes["classifier.bias"] = (classes, 2048), (classes,)
    return shapes


def torchreid_ibn_file(variant: str, classes: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in torchreid_ibn_shapes(variant, classes).items():
        if key.endswith("num_batches_tracked"):
            t = torch.tensor(100)
        elif len(shape) > 1:
            t = torch.randn(shape, generator=g) / torch.tensor(shape[1:]).prod().float().sqrt()
        elif key.endswith(("running_var", "weight")):
            t = torch.rand(shape, generator=g) + 0.5
        else:
            t = torch.randn(shape, generator=g) * 0.05
        state[key] = t
    return state


def torchreid_forward(sd: dict, x: torch.Tensor, variant: str) -> torch.Tensor:
    """torchreid's ResNet-IBN eval forward: featuremaps -> AdaptiveAvgPool2d(1) -> view."""

    def bn(t, p):
        return F.batch_norm(t, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                            False, 0.0, 1e-5)

    def inorm(t, p):
        return F.instance_norm(t, weight=sd[p + "weight"], bias=sd[p + "bias"], eps=1e-5)

    t = F.conv2d(x, sd["conv1.weight"], stride=2, padding=3)
    t = F.max_pool2d(F.relu(inorm(t, "bn1.") if variant == "b" else bn(t, "bn1.")), 3, 2, 1)
    for layer, (blocks, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2)), 1):
        for i in range(blocks):
            p, s = f"layer{layer}.{i}.", stride if i == 0 else 1
            out = F.conv2d(t, sd[p + "conv1.weight"])
            if p + "bn1.IN.weight" in sd:
                half = sd[p + "bn1.IN.weight"].numel()
                out = torch.cat([inorm(out[:, :half], p + "bn1.IN."), bn(out[:, half:], p + "bn1.BN.")], 1)
            else:
                out = bn(out, p + "bn1.")
            out = F.relu(bn(F.conv2d(F.relu(out), sd[p + "conv2.weight"], stride=s, padding=1), p + "bn2."))
            out = bn(F.conv2d(out, sd[p + "conv3.weight"]), p + "bn3.")
            if p + "downsample.0.weight" in sd:
                out = out + bn(F.conv2d(t, sd[p + "downsample.0.weight"], stride=s), p + "downsample.1.")
            else:
                out = out + t
            if p + "IN.weight" in sd:
                out = inorm(out, p + "IN.")
            t = F.relu(out)
    return t.mean((2, 3))


@pytest.mark.parametrize("variant", ["a", "b"])
def test_torchreid_ibn_files_load_and_compute_torchreids_features(tmp_path, variant):
    state = torchreid_ibn_file(variant, classes=751)
    # IBN-a: 2 more tensors per IBN block (13) than ResNet-50's 318; IBN-b: an IN stem (-3) and two INs (+4).
    assert len(state) == {"a": 344, "b": 319}[variant] + 2
    path = tmp_path / f"resnet50_ibn_{variant}.pth.tar-60"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 60, "rank1": 0.8,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    assert detect_format(torch.load(path, weights_only=True)) == "torchreid"
    loaded = load_inference_model(load_config(None, OPTS), path)
    m = loaded.cfg.MODEL
    assert (m.NAME, m.HEAD, m.LINEAR_NUM, m.LAST_STRIDE) == (f"resnet50_ibn_{variant}", "torchreid", 0, 2)
    assert (list(loaded.cfg.INPUT.SIZE_TEST), loaded.cfg.INPUT.INTERPOLATION) == ([256, 128], "bilinear")
    x = torch.randn(16, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = loaded.model(x), torchreid_forward(state, x, variant)
    assert cosines(ours, theirs).min() >= 0.9999
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_an_ibn_file_of_another_depth_is_refused_by_name(tmp_path):
    state = torchreid_ibn_file("a")
    state = {k: v for k, v in state.items() if not k.startswith("layer3.5.")}  # a 5-block layer3
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="torchreid checkpoint of a ResNet-IBN-a of a depth"):
        load_inference_model(load_config(None, OPTS), tmp_path / "odd.pth")


def test_torchreid_ibn_b_through_every_entry(few_people, tmp_path):
    state = torchreid_ibn_file("b", classes=751, seed=2)
    path = tmp_path / "resnet50_ibn_b_market.pth"
    torch.save(state, path)

    def reference(x):
        with torch.no_grad():
            return torchreid_forward(state, x, "b")

    through_every_entry(path, few_people, tmp_path, source="torchreid resnet50_ibn_b", fmt="torchreid",
                        size=(256, 128), reference=reference, resample=Image.Resampling.BILINEAR,
                        mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                        train_opts=tiny_train_opts(few_people, tmp_path / "unused"))
