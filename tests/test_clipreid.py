"""CLIP-ReID files (Syliz517/CLIP-ReID): its key names and shapes, its forward pass restated here.

The files are built the way CLIP-ReID's `torch.save(model.state_dict())` lays them out, with
random weights: `image_encoder.*` (OpenAI's CLIP names), the two BNNecks and classifiers,
`cv_embed` with side information and the text side (`prompt_learner.*`, `text_encoder.*`) of the
two-stage model. `_vit_reference` / `_rn_reference` compute CLIP-ReID's eval feature from those
tensors with plain torch ops, independently of open_clip, which builds strongreid's model.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from strongreid import FeatureExtractor
from strongreid.cli import main
from strongreid.config import load_config
from strongreid.errors import CheckpointError, ConfigError
from strongreid.modeling import build_model
from strongreid.modeling.formats import detect_format
from strongreid.modeling.loading import load_inference_model

OPTS = ["MODEL.DEVICE", "cpu", "MODEL.AMP", "off", "MODEL.CHANNELS_LAST", "off",
        "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "16"]


def _cfg(*extra: str):
    return load_config(None, [*OPTS, *extra])


class _Random:
    """Seeded tensors scaled so that a 12-block residual stack stays finite and non-trivial."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def w(self, *shape: int, fan_in: int | None = None) -> torch.Tensor:
        fan = fan_in if fan_in is not None else (shape[-1] if len(shape) > 1 else 1)
        return torch.randn(*shape, generator=self.g) / math.sqrt(fan)

    def norm(self, prefix: str, n: int, out: dict, bn: bool = False) -> None:
        out[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(n, generator=self.g)
        out[f"{prefix}.bias"] = 0.1 * torch.randn(n, generator=self.g)
        if bn:
            out[f"{prefix}.running_mean"] = 0.2 * torch.randn(n, generator=self.g)
            out[f"{prefix}.running_var"] = 0.5 + torch.rand(n, generator=self.g) * 1.5
            out[f"{prefix}.num_batches_tracked"] = torch.tensor(100)


def _heads(r: _Random, out: dict, width: int, proj: int, classes: int, cameras: int) -> None:
    r.norm("bottleneck", width, out, bn=True)
    r.norm("bottleneck_proj", proj, out, bn=True)
    out["classifier.weight"] = r.w(classes, width)
    out["classifier_proj.weight"] = r.w(classes, proj)
    if cameras:
        out["cv_embed"] = 0.5 * r.w(cameras, width, fan_in=1)


def _text_side(r: _Random, out: dict, classes: int, width: int = 512, layers: int = 12) -> None:
    """CLIP's text transformer as CLIP-ReID's TextEncoder holds it, and the PromptLearner's tokens."""
    for i in range(layers):
        p = f"text_encoder.transformer.resblocks.{i}"
        out[f"{p}.attn.in_proj_weight"] = r.w(3 * width, width)
        out[f"{p}.attn.in_proj_bias"] = r.w(3 * width, fan_in=1)
        out[f"{p}.attn.out_proj.weight"] = r.w(width, width)
        out[f"{p}.attn.out_proj.bias"] = r.w(width, fan_in=1)
        r.norm(f"{p}.ln_1", width, out)
        out[f"{p}.mlp.c_fc.weight"] = r.w(4 * width, width)
        out[f"{p}.mlp.c_fc.bias"] = r.w(4 * width, fan_in=1)
        out[f"{p}.mlp.c_proj.weight"] = r.w(width, 4 * width)
        out[f"{p}.mlp.c_proj.bias"] = r.w(width, fan_in=1)
        r.norm(f"{p}.ln_2", width, out)
    out["text_encoder.positional_embedding"] = r.w(77, width)
    r.norm("text_encoder.ln_final", width, out)
    out["text_encoder.text_projection"] = r.w(width, width)
    out["prompt_learner.cls_ctx"] = r.w(classes, 4, width)
    out["prompt_learner.token_prefix"] = r.w(1, 5, width)
    out["prompt_learner.token_suffix"] = r.w(1, 68, width)


def clipreid_vit(width=768, layers=12, patch=16, grid=(16, 8), proj=512, classes=751,
                 cameras=0, text=True, seed=0) -> dict[str, torch.Tensor]:
    r = _Random(seed)
    e: dict[str, torch.Tensor] = {}
    e["class_embedding"] = r.w(width, fan_in=width)
    e["positional_embedding"] = r.w(grid[0] * grid[1] + 1, width, fan_in=width)
    e["proj"] = r.w(width, proj, fan_in=width)
    e["conv1.weight"] = r.w(width, 3, patch, patch, fan_in=3 * patch * patch)
    r.norm("ln_pre", width, e)
    for i in range(layers):
        p = f"transformer.resblocks.{i}"
        e[f"{p}.attn.in_proj_weight"] = r.w(3 * width, width)
        e[f"{p}.attn.in_proj_bias"] = 0.1 * r.w(3 * width, fan_in=1)
        e[f"{p}.attn.out_proj.weight"] = r.w(width, width)
        e[f"{p}.attn.out_proj.bias"] = 0.1 * r.w(width, fan_in=1)
        r.norm(f"{p}.ln_1", width, e)
        e[f"{p}.mlp.c_fc.weight"] = r.w(4 * width, width)
        e[f"{p}.mlp.c_fc.bias"] = 0.1 * r.w(4 * width, fan_in=1)
        e[f"{p}.mlp.c_proj.weight"] = r.w(width, 4 * width)
        e[f"{p}.mlp.c_proj.bias"] = 0.1 * r.w(width, fan_in=1)
        r.norm(f"{p}.ln_2", width, e)
    r.norm("ln_post", width, e)
    out = {f"image_encoder.{k}": v for k, v in e.items()}
    if text:
        _text_side(r, out, classes)
    _heads(r, out, width, proj, classes, cameras)
    return out


def clipreid_rn(stages=(3, 4, 6, 3), width=64, grid=(16, 8), proj=1024, classes=751, text=True,
                seed=0) -> dict[str, torch.Tensor]:
    r = _Random(seed)
    e: dict[str, torch.Tensor] = {}
    for i, (cin, cout) in enumerate([(3, width // 2), (width // 2, width // 2), (width // 2, width)], 1):
        e[f"conv{i}.weight"] = r.w(cout, cin, 3, 3, fan_in=cin * 9)
        r.norm(f"bn{i}", cout, e, bn=True)
    inplanes = width
    for s, blocks in enumerate(stages, 1):
        planes = width * 2 ** (s - 1)
        for b in range(blocks):
            p = f"layer{s}.{b}"
            e[f"{p}.conv1.weight"] = r.w(planes, inplanes, 1, 1, fan_in=inplanes)
            e[f"{p}.conv2.weight"] = r.w(planes, planes, 3, 3, fan_in=planes * 9)
            e[f"{p}.conv3.weight"] = r.w(planes * 4, planes, 1, 1, fan_in=planes)
            for j, n in ((1, planes), (2, planes), (3, planes * 4)):
                r.norm(f"{p}.bn{j}", n, e, bn=True)
            if b == 0:
                e[f"{p}.downsample.0.weight"] = r.w(planes * 4, inplanes, 1, 1, fan_in=inplanes)
                r.norm(f"{p}.downsample.1", planes * 4, e, bn=True)
            inplanes = planes * 4
    embed = width * 32
    e["attnpool.positional_embedding"] = r.w(grid[0] * grid[1] + 1, embed, fan_in=embed)
    for name in ("k_proj", "q_proj", "v_proj"):
        e[f"attnpool.{name}.weight"] = r.w(embed, embed)
        e[f"attnpool.{name}.bias"] = 0.1 * r.w(embed, fan_in=1)
    e["attnpool.c_proj.weight"] = r.w(proj, embed)
    e["attnpool.c_proj.bias"] = 0.1 * r.w(proj, fan_in=1)
    out = {f"image_encoder.{k}": v for k, v in e.items()}
    if text:
        _text_side(r, out, classes, layers=2)
    _heads(r, out, embed, proj, classes, 0)
    return out


# -- CLIP-ReID's eval forward, restated --------------------------------------------------------


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)


def _bn(x, sd, p):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = sd[f"{p}.running_mean"].view(shape), sd[f"{p}.running_var"].view(shape)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[f"{p}.weight"].view(shape) + sd[f"{p}.bias"].view(shape)


def _attention(q, k, v, heads):
    b, n, c = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    w = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
    return (w @ split(v)).transpose(1, 2).reshape(b, n, c)


def _necks(sd, img, proj, neck_feat):
    if neck_feat == "after":
        return torch.cat([_bn(img, sd, "bottleneck"), _bn(proj, sd, "bottleneck_proj")], dim=1)
    return torch.cat([img, proj], dim=1)


def _vit_reference(sd, x, stride=16, neck_feat="before", camids=None, sie_coe=1.0):
    """VisionTransformer.forward + build_transformer's eval branch of CLIP-ReID, by hand."""
    e = {k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.")}
    width = e["conv1.weight"].shape[0]
    heads = max(1, width // 64)
    t = F.conv2d(x, e["conv1.weight"], stride=stride).flatten(2).transpose(1, 2)
    cls = e["class_embedding"].expand(x.shape[0], 1, width)
    if camids is not None:
        cls = cls + sie_coe * sd["cv_embed"][camids].unsqueeze(1)
    t = _ln(torch.cat([cls, t], dim=1) + e["positional_embedding"], e, "ln_pre")
    layers = len({k.split(".")[2] for k in e if k.startswith("transformer.resblocks.")})
    for i in range(layers):
        p = f"transformer.resblocks.{i}"
        h = _ln(t, e, f"{p}.ln_1")
        q, k, v = (h @ e[f"{p}.attn.in_proj_weight"].T + e[f"{p}.attn.in_proj_bias"]).chunk(3, dim=-1)
        t = t + _attention(q, k, v, heads) @ e[f"{p}.attn.out_proj.weight"].T + e[f"{p}.attn.out_proj.bias"]
        h = _ln(t, e, f"{p}.ln_2") @ e[f"{p}.mlp.c_fc.weight"].T + e[f"{p}.mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        t = t + h @ e[f"{p}.mlp.c_proj.weight"].T + e[f"{p}.mlp.c_proj.bias"]
    img = _ln(t, e, "ln_post")[:, 0]
    return _necks(sd, img, img @ e["proj"], neck_feat)


def _rn_reference(sd, x, neck_feat="before"):
    """ModifiedResNet (layer4 at stride 1) + AttentionPool2d's mean token + the necks, by hand."""
    e = {k[len("image_encoder."):]: v for k, v in sd.items() if k.startswith("image_encoder.")}
    for i, stride in ((1, 2), (2, 1), (3, 1)):
        x = F.relu(_bn(F.conv2d(x, e[f"conv{i}.weight"], stride=stride, padding=1), e, f"bn{i}"))
    x = F.avg_pool2d(x, 2)
    for s, stage_stride in ((1, 1), (2, 2), (3, 2), (4, 1)):
        b = 0
        while f"layer{s}.{b}.conv1.weight" in e:
            p, stride = f"layer{s}.{b}", (stage_stride if b == 0 else 1)
            out = F.relu(_bn(F.conv2d(x, e[f"{p}.conv1.weight"]), e, f"{p}.bn1"))
            out = F.relu(_bn(F.conv2d(out, e[f"{p}.conv2.weight"], padding=1), e, f"{p}.bn2"))
            if stride > 1:
                out = F.avg_pool2d(out, stride)
            out = _bn(F.conv2d(out, e[f"{p}.conv3.weight"]), e, f"{p}.bn3")
            skip = x
            if f"{p}.downsample.0.weight" in e:
                skip = F.avg_pool2d(x, stride) if stride > 1 else x
                skip = _bn(F.conv2d(skip, e[f"{p}.downsample.0.weight"]), e, f"{p}.downsample.1")
            x = F.relu(out + skip)
            b += 1
    img = x.mean(dim=(2, 3))
    tokens = torch.cat([img.unsqueeze(1), x.flatten(2).transpose(1, 2)], dim=1)
    tokens = tokens + e["attnpool.positional_embedding"]
    lin = lambda t, n: t @ e[f"attnpool.{n}.weight"].T + e[f"attnpool.{n}.bias"]  # noqa: E731
    heads = e["layer1.0.conv1.weight"].shape[0] * 32 // 64
    pooled = _attention(lin(tokens[:, :1], "q_proj"), lin(tokens, "k_proj"), lin(tokens, "v_proj"), heads)
    proj = lin(pooled[:, 0], "c_proj")
    return _necks(sd, img, proj, neck_feat)


def _images(n=16, size=(256, 128), seed=3):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _cosines(a, b):
    return F.cosine_similarity(a, b, dim=1)


# -- the tests -----------------------------------------------------------------------------------


def test_vit_b16_file_loads_without_a_format_key_and_matches_clipreid(tmp_path):
    state = clipreid_vit()
    path = tmp_path / "ViT-B-16_60.pth"
    torch.save(state, path)
    assert detect_format(torch.load(path, weights_only=True)) == "clipreid"
    loaded = load_inference_model(_cfg(), path)
    cfg = loaded.cfg
    assert loaded.format == "clipreid" and cfg.MODEL.NAME == "clip:ViT-B-16" and cfg.MODEL.TIMM_KWARGS == ""
    assert list(cfg.INPUT.SIZE_TEST) == [256, 128] and cfg.INPUT.INTERPOLATION == "bilinear"
    assert list(cfg.INPUT.PIXEL_MEAN) == [0.5] * 3 and list(cfg.INPUT.PIXEL_STD) == [0.5] * 3
    assert cfg.TEST.NECK_FEAT == "before" and any("NECK_FEAT" in w for w in loaded.warnings)
    x = _images()
    with torch.no_grad():
        ours = loaded.model(x)
        theirs = _vit_reference(state, x)
    assert ours.shape == (16, 768 + 512)
    assert float(_cosines(ours, theirs).min()) >= 0.9999
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)


def test_rn50_file_matches_clipreid(tmp_path):
    state = clipreid_rn()
    path = tmp_path / "RN50_120.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # saved from DataParallel
    loaded = load_inference_model(_cfg("TEST.NECK_FEAT", "after"), path)
    cfg = loaded.cfg
    assert cfg.MODEL.NAME == "clip:RN50" and cfg.MODEL.TIMM_KWARGS == "" and cfg.MODEL.LAST_STRIDE == 1
    assert list(cfg.INPUT.SIZE_TEST) == [256, 128]
    assert list(cfg.INPUT.PIXEL_MEAN) == [0.485, 0.456, 0.406]  # its CNN configs: ImageNet's
    assert cfg.TEST.NECK_FEAT == "after" and loaded.warnings == ()  # the user's choice stands
    x = _images()
    with torch.no_grad():
        ours = loaded.model(x)
        theirs = _rn_reference(state, x, neck_feat="after")
    assert ours.shape == (16, 2048 + 1024)
    assert float(_cosines(ours, theirs).min()) >= 0.9999


def test_overlapping_patches_and_camera_embedding(tmp_path):
    # CLIP-ReID + SIE + OLP: stride 12 gives a 21 x 10 grid at 256x128; one embedding per camera.
    state = clipreid_vit(width=128, layers=3, grid=(21, 10), proj=64, classes=20, cameras=6, seed=4)
    path = tmp_path / "sie_olp.pth"
    torch.save(state, path)
    loaded = load_inference_model(_cfg("TEST.NECK_FEAT", "after"), path)
    cfg = loaded.cfg
    assert cfg.MODEL.SIE_CAMERA and cfg.MODEL.SIE_CAMERA_NUM == 6 and cfg.MODEL.SIE_COE == 1.0
    assert "stride: 12" in cfg.MODEL.TIMM_KWARGS and list(cfg.INPUT.SIZE_TEST) == [256, 128]
    assert any("SIE_COE" in w for w in loaded.warnings)
    x, cams = _images(4), torch.tensor([0, 5, 2, 2])
    with torch.no_grad():
        with_cams = loaded.model(x, cams)
        without = loaded.model(x)
        ref_cams = _vit_reference(state, x, stride=12, neck_feat="after", camids=cams)
        ref_none = _vit_reference(state, x, stride=12, neck_feat="after")
    assert float(_cosines(with_cams, ref_cams).min()) >= 0.9999
    assert float(_cosines(without, ref_none).min()) >= 0.9999
    assert float((with_cams - without).abs().max()) > 1e-2  # the cameras change the feature
    # `strongreid test` / training's evaluation hand the loader's camera ids to such a model.
    from strongreid.engine.inference import extract_features

    batches = [(x[:2], [1, 2], cams[:2].tolist(), ["a", "b"]), (x[2:], [3, 4], cams[2:].tolist(), ["c", "d"])]
    feats, _, _, _ = extract_features(loaded.model, batches, torch.device("cpu"))
    torch.testing.assert_close(feats, with_cams)
    with pytest.raises(ConfigError, match="SIE_CAMERA_NUM"), torch.no_grad():
        loaded.model(x, torch.tensor([0, 6, 0, 0]))
    with torch.no_grad():  # an unknown camera (-1) gets no camera term, that image alone
        mixed = loaded.model(x, torch.tensor([0, -1, 2, -1]))
    torch.testing.assert_close(mixed[[1, 3]], without[[1, 3]])
    torch.testing.assert_close(mixed[[0, 2]], loaded.model.eval()(x[[0, 2]], camids=torch.tensor([0, 2])))
    with pytest.raises(ConfigError, match="training with MODEL.SIE_CAMERA"):
        loaded.model.train()(x)


def test_every_image_tensor_used_text_side_named(tmp_path):
    state = clipreid_vit(width=64, layers=2, grid=(4, 2), proj=32, classes=5)
    path = tmp_path / "small.pth"
    torch.save(state, path)
    from strongreid.modeling.formats import CHECKPOINT_FORMATS

    converted = CHECKPOINT_FORMATS.get("clipreid")().convert(state, path)
    text = {k for k in state if k.startswith(("text_encoder.", "prompt_learner."))}
    assert {i.split(" ")[0] for i in converted.ignored} == text
    assert len(converted.state) == len(state) - len(text)
    # An unknown tensor is an error naming it, not a silent drop.
    with pytest.raises(CheckpointError, match="memory_bank"):
        CHECKPOINT_FORMATS.get("clipreid")().convert({**state, "memory_bank": torch.zeros(3)}, path)
    # A 64x32 crop model (2:1 grid at stride 16) is read off its 4 x 2 grid.
    loaded = load_inference_model(_cfg(), path)
    assert list(loaded.cfg.INPUT.SIZE_TEST) == [64, 32]
    assert loaded.cfg.MODEL.TIMM_KWARGS == "{width: 64, layers: 2, heads: 1, output_dim: 32}"


def test_the_baseline_trains_with_summed_losses():
    cfg = _cfg("MODEL.NAME", "clip:ViT-B-16", "MODEL.HEAD", "visual_clipreid", "MODEL.PRETRAIN_CHOICE", "none",
               "MODEL.TIMM_KWARGS", "{width: 64, layers: 2, heads: 1, output_dim: 32}",
               "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]",
               "DATALOADER.SAMPLER", "softmax_triplet")
    model = build_model(cfg, 4).train()
    from strongreid.losses import build_loss

    loss = build_loss(cfg, 4, model.feat_dim)
    out = model(_images(8, (64, 32)))
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    terms = loss(out, targets)
    # CLIP-ReID's baseline: ID loss summed over both classifiers, triplet over the three features.
    id_each = [loss.id_loss(logits, targets) for logits in out.logits]
    tri_each = [loss.triplet(f, targets) for f in out.features]
    torch.testing.assert_close(terms["id"], sum(id_each))
    torch.testing.assert_close(terms["triplet"], sum(tri_each))
    terms["total"].backward()
    assert model.backbone.visual.conv1.weight.grad is not None
    assert model.bottleneck.bias.grad is None  # BNNeck shift frozen


def test_refusals_name_the_key():
    base = ["MODEL.NAME", "clip:ViT-B-16", "MODEL.HEAD", "visual_clipreid", "MODEL.PRETRAIN_CHOICE", "none"]
    with pytest.raises(ConfigError, match="NECK"):
        build_model(_cfg(*base, "MODEL.NECK", "no"), 3)
    with pytest.raises(ConfigError, match="SIE_CAMERA_NUM"):
        build_model(_cfg(*base, "MODEL.SIE_CAMERA", "True"), 3)
    with pytest.raises(ConfigError, match="IF_WITH_CENTER"):
        build_model(_cfg(*base, "MODEL.IF_WITH_CENTER", "yes", "MODEL.METRIC_LOSS_TYPE", "triplet_center",
                         "DATALOADER.SAMPLER", "softmax_triplet"), 3)
    with pytest.raises(ConfigError, match="CLIP image tower"):
        build_model(_cfg("MODEL.NAME", "resnet18", "MODEL.HEAD", "visual_clipreid", "MODEL.PRETRAIN_CHOICE", "none"), 3)
    with pytest.raises(ConfigError, match="do not apply"):
        build_model(_cfg(*base, "MODEL.TIMM_KWARGS", "{depth: 3}"), 3)


@pytest.mark.skipif(__import__("importlib").util.find_spec("onnxruntime") is None,
                    reason="the deploy extra (onnx, onnxruntime) is not installed")
def test_file_through_test_extract_extractor_gallery_and_boxmot(tiny_synthetic_root, tmp_path, capsys):
    import onnxruntime as ort

    state = clipreid_vit(width=64, layers=12, grid=(16, 8), proj=32, classes=751, seed=7)
    path = tmp_path / "ViT-B-16_clipreid_market.pth"
    torch.save(state, path)
    data = ["DATASETS.NAMES", "synthetic", "DATASETS.ROOT_DIR", str(tiny_synthetic_root)]
    out = tmp_path / "test"
    assert main(["test", *OPTS, *data, "TEST.WEIGHT", str(path), "OUTPUT_DIR", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["mAP"] <= 1 and results["num_query"] > 0
    assert "CLIP-ReID ViT" in (out / "log.txt").read_text()

    images = sorted((tiny_synthetic_root / "synthetic" / "query").glob("*.jpg"))[:6]
    crops = tmp_path / "crops"
    crops.mkdir()
    for p in images:
        Image.open(p).save(crops / p.name)
    feats = tmp_path / "feats.npz"
    assert main(["extract", *OPTS, "TEST.WEIGHT", str(path), "--images", str(crops), "--out", str(feats)]) == 0
    extracted = np.load(feats)
    key = next(k for k in extracted.files if extracted[k].ndim == 2)
    assert extracted[key].shape == (6, 96)

    extractor = FeatureExtractor(load_config(None, OPTS), path, device="cpu")
    assert extractor.checkpoint_format == "clipreid" and extractor.feat_dim == 96
    pil = [Image.open(crops / p.name).convert("RGB") for p in images]
    via_extractor = extractor(pil)
    np.testing.assert_allclose(extracted[key], via_extractor.numpy(), atol=1e-5)
    # The extractor's preprocessing is CLIP-ReID's: bilinear resize to 256x128, mean/std 0.5.
    by_hand = torch.stack([torch.from_numpy(np.asarray(im.resize((128, 256), Image.BILINEAR),
                                                       dtype=np.float32)).permute(2, 0, 1) / 255
                           for im in pil])
    with torch.no_grad():
        ref = F.normalize(_vit_reference(state, (by_hand - 0.5) / 0.5), dim=1)
    assert float(_cosines(via_extractor, ref).min()) >= 0.9999

    gallery = tmp_path / "gallery.db"
    assert main(["gallery", "ingest", "--gallery", str(gallery), "--model", str(path),
                 "--crops", str(crops), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("6 crops added")

    onnx_path = tmp_path / "clipreid.onnx"
    assert main(["export", "--target", "boxmot", "--out", str(onnx_path), *OPTS,
                 "TEST.WEIGHT", str(path)]) == 0
    sidecar = json.loads((tmp_path / "clipreid.onnx.metadata.json").read_text())
    assert sidecar["model_kwargs"] == {"img_size": [256, 128]}
    # BoxMOT feeds ImageNet-normalised crops; the graph folds CLIP-ReID's 0.5/0.5 in.
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    imagenet_std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ((by_hand - imagenet_mean) / imagenet_std).numpy()})[0]
    assert np.abs(got - via_extractor.numpy()).max() <= 1e-4


@pytest.mark.parametrize("preset", ["clipreid_vit_base", "clipreid_rn50_base", "clipreid_demo"])
def test_presets_load_validate_and_build(preset):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / f"{preset}.yml"
    cfg = load_config(str(path), ["MODEL.PRETRAIN_CHOICE", "none"])
    assert cfg.MODEL.HEAD == "visual_clipreid" and cfg.TEST.NECK_FEAT == "before"
    if preset == "clipreid_demo":
        model = build_model(cfg, 7)
        assert model.backbone.grid == (10, 5) and model.feat_dim == 192 + 128


def test_clip_weights_file_resized_as_clipreid_resizes(tmp_path):
    # CLIP's own ViT state dict (224x224: 14 x 14 grid) with its text side, as MODEL.PRETRAIN_PATH.
    sd = clipreid_vit(width=64, layers=2, grid=(14, 14), proj=32, classes=3, text=False, seed=5)
    clip_file = {k.replace("image_encoder.", "visual."): v for k, v in sd.items() if k.startswith("image_encoder.")}
    clip_file["token_embedding.weight"] = torch.zeros(10, 8)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(clip_file, path)
    cfg = _cfg("MODEL.NAME", "clip:ViT-B-16", "MODEL.HEAD", "visual_clipreid", "MODEL.PRETRAIN_PATH", str(path),
               "MODEL.TIMM_KWARGS", "{width: 64, layers: 2, heads: 1, output_dim: 32}",
               "INPUT.SIZE_TRAIN", "[256, 128]")
    model = build_model(cfg, 3)
    posemb = clip_file["visual.positional_embedding"]
    grid = posemb[1:].reshape(1, 14, 14, 64).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 8), mode="bilinear").permute(0, 2, 3, 1).reshape(128, 64)
    torch.testing.assert_close(model.backbone.visual.positional_embedding.data, torch.cat([posemb[:1], grid]))
    torch.testing.assert_close(model.backbone.visual.conv1.weight.data, clip_file["visual.conv1.weight"])


def test_trained_clip_model_round_trips_as_a_strongreid_checkpoint(tmp_path):
    from test_deploy import save_ckpt

    cfg = _cfg("MODEL.NAME", "clip:RN50", "MODEL.HEAD", "visual_clipreid", "MODEL.PRETRAIN_CHOICE", "none",
               "MODEL.TIMM_KWARGS", "{width: 16, layers: [1, 1, 1, 1], heads: 2, output_dim: 24}",
               "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]")
    path = save_ckpt(tmp_path / "clip_rn.pt", cfg, num_classes=6)
    loaded = load_inference_model(cfg, path)
    assert loaded.format == "strongreid" and loaded.model.feat_dim == 16 * 32 + 24
    x = _images(3, (64, 32))
    torch.manual_seed(0)
    again = build_model(cfg, 6).eval()
    again.load_state_dict(torch.load(path, weights_only=True)["model"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), again(x))
