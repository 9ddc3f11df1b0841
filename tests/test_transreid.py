"""TransReID: files built with damo-cv/TransReID's key names and shapes (random weights) load with
no format key and give the features TransReID's forward computes (written out below from its
model/make_model.py and backbones/vit_pytorch.py); the camera reaches SIE wherever it is known;
the file goes through `test`, `extract`, FeatureExtractor, a search gallery and the BoxMOT
export; the presets load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _train_utils import tiny_train_opts
from PIL import Image

from strongreid import FeatureExtractor
from strongreid.cli import main
from strongreid.config import load_config
from strongreid.engine.inference import extract_features
from strongreid.errors import CheckpointError, ConfigError
from strongreid.modeling import build_model
from strongreid.modeling.formats import CHECKPOINT_FORMATS, detect_format
from strongreid.modeling.loading import load_inference_model
from strongreid.modeling.outputs import Branches

ROOT = Path(__file__).resolve().parents[1]
CPU = ["MODEL.DEVICE", "cpu", "MODEL.PRETRAIN_CHOICE", "none", "MODEL.AMP", "off",
       "MODEL.CHANNELS_LAST", "off", "TEST.IMS_PER_BATCH", "8"]
MEAN = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)


# -- a TransReID file ------------------------------------------------------------------------

def transreid_file(dim: int, depth: int, classes: int, patches: int, cams: int = 0, jpm: bool = True,
                   hidden: int | None = None, qkv_bias: bool = True, seed: int = 0) -> dict:
    """`model.state_dict()` of TransReID's build_transformer(_local): key names and shapes of
    its code, random weights (layer norms near 1, BN statistics positive)."""
    g = torch.Generator().manual_seed(seed)
    hidden = hidden or 4 * dim
    s: dict[str, torch.Tensor] = {}

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm(prefix: str) -> None:
        s[prefix + "weight"], s[prefix + "bias"] = 1 + rnd(dim, std=0.1), rnd(dim)

    def block(p: str) -> None:
        norm(p + "norm1.")
        s[p + "attn.qkv.weight"] = rnd(3 * dim, dim)
        if qkv_bias:
            s[p + "attn.qkv.bias"] = rnd(3 * dim)
        s[p + "attn.proj.weight"], s[p + "attn.proj.bias"] = rnd(dim, dim), rnd(dim)
        norm(p + "norm2.")
        s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = rnd(hidden, dim), rnd(hidden)
        s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = rnd(dim, hidden), rnd(dim)

    s["base.cls_token"] = rnd(1, 1, dim)
    s["base.pos_embed"] = rnd(1, patches + 1, dim)
    if cams:
        s["base.sie_embed"] = rnd(cams, 1, dim)
    s["base.patch_embed.proj.weight"] = rnd(dim, 3, 16, 16, std=0.05)
    s["base.patch_embed.proj.bias"] = rnd(dim)
    for i in range(depth):
        block(f"base.blocks.{i}.")
    norm("base.norm.")
    s["base.fc.weight"], s["base.fc.bias"] = rnd(1000, dim), rnd(1000)
    if jpm:
        for branch in ("b1", "b2"):
            block(f"{branch}.0.")
            norm(f"{branch}.1.")
    for suffix in [""] + ([f"_{i}" for i in range(1, 5)] if jpm else []):
        p = f"bottleneck{suffix}."
        s[p + "weight"], s[p + "bias"] = 1 + rnd(dim, std=0.1), torch.zeros(dim)
        s[p + "running_mean"], s[p + "running_var"] = rnd(dim, std=0.1), 0.5 + torch.rand(dim, generator=g)
        s[p + "num_batches_tracked"] = torch.tensor(100)
        s[f"classifier{suffix}.weight"] = rnd(classes, dim, std=0.001)
    return s


def transreid_features(s: dict, x: torch.Tensor, camids: torch.Tensor | None, *, heads: int,
                       stride: int, coe: float = 3.0, shift: int = 5, groups: int = 2,
                       neck_feat: str = "before", qk_scale: float | None = None) -> torch.Tensor:
    """TransReID's eval forward on a state dict, as its code computes it."""
    dim = s["base.cls_token"].shape[-1]
    depth = len({k.split(".")[2] for k in s if k.startswith("base.blocks.")})
    jpm = "b1.0.norm1.weight" in s

    def ln(t, p):
        return F.layer_norm(t, (dim,), s[p + "weight"], s[p + "bias"], eps=1e-6)

    def block(t, p):
        b, n, _ = t.shape
        qkv = F.linear(ln(t, p + "norm1."), s[p + "attn.qkv.weight"], s.get(p + "attn.qkv.bias"))
        q, k, v = qkv.view(b, n, 3, heads, dim // heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        scale = qk_scale or (dim // heads) ** -0.5
        mixed = (torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v).transpose(1, 2).reshape(b, n, dim)
        t = t + F.linear(mixed, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(t, p + "norm2."), s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"]))
        return t + F.linear(h, s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])

    def bn(f, p):
        return (f - s[p + "running_mean"]) / torch.sqrt(s[p + "running_var"] + 1e-5) * s[p + "weight"] + s[p + "bias"]

    t = F.conv2d(x, s["base.patch_embed.proj.weight"], s["base.patch_embed.proj.bias"], stride=stride)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([s["base.cls_token"].expand(len(x), 1, dim), t], 1) + s["base.pos_embed"]
    if "base.sie_embed" in s:
        t = t + coe * s["base.sie_embed"][camids]
    for i in range(depth - 1 if jpm else depth):
        t = block(t, f"base.blocks.{i}.")
    if not jpm:
        g = ln(t, "base.norm.")[:, 0]
        return bn(g, "bottleneck.") if neck_feat == "after" else g
    glob = ln(block(t, "b1.0."), "b1.1.")[:, 0]
    # Shift: the patches rotated left by shift - 1 (the class token stays out); shuffle: when
    # the count is odd the second-to-last patch is repeated, then the two halves interleave.
    patches = torch.roll(t[:, 1:], -(shift - 1), dims=1)
    if patches.shape[1] % groups:
        patches = torch.cat([patches, patches[:, -2:-1]], 1)
    run = patches.shape[1] // groups
    patches = patches[:, [gi * run + j for j in range(run) for gi in range(groups)]]
    size = (t.shape[1] - 1) // 4
    feats = [glob]
    for i in range(4):
        part = torch.cat([t[:, :1], patches[:, i * size:(i + 1) * size]], 1)
        feats.append(ln(block(part, "b2.0."), "b2.1.")[:, 0])
    if neck_feat == "after":
        feats = [bn(f, f"bottleneck{sfx}.") for f, sfx in zip(feats, ["", "_1", "_2", "_3", "_4"])]
    return torch.cat([feats[0]] + [f / 4 for f in feats[1:]], 1)


def _cosine_min(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=1).min())


# -- the file, its format and the forward ----------------------------------------------------

def test_vit_b_stride12_sie_jpm_matches_transreids_forward(tmp_path, caplog):
    # ViT-B's width (768, 12 heads of 64) at TransReID's 256x128 stride 12 (21 x 10 patches),
    # with 3 of its 12 blocks: the key names are those of the full model.
    state = transreid_file(768, 3, classes=751, patches=210, cams=6, seed=1)
    path = tmp_path / "transformer_120.pth"
    torch.save({"module." + k: v for k, v in state.items()}, path)  # saved under DDP
    assert detect_format(torch.load(path, weights_only=True)) == "transreid"
    loaded = load_inference_model(load_config(None, CPU), path)
    cfg = loaded.cfg
    assert cfg.MODEL.NAME == "transreid:vit_base_patch16_224" and cfg.MODEL.HEAD == "transreid"
    assert list(cfg.INPUT.SIZE_TEST) == [256, 128] and list(cfg.MODEL.TRANSREID.STRIDE_SIZE) == [12, 12]
    assert list(cfg.INPUT.PIXEL_MEAN) == [0.5] * 3 and cfg.INPUT.INTERPOLATION == "bilinear"
    assert cfg.MODEL.TRANSREID.CAMERA_NUM == 6 and cfg.MODEL.TRANSREID.NUM_HEADS == 12
    assert cfg.TEST.NECK_FEAT == "before" and cfg.MODEL.TRANSREID.SHIFT_NUM == 5
    assert any("NUM_HEADS" in w for w in loaded.warnings)  # 3 blocks: not a published shape
    assert loaded.model.backbone.patch_embed.grid == (21, 10) and loaded.model.feat_dim == 5 * 768

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 256, 128, generator=gen)
    cams = torch.arange(16) % 6
    with torch.no_grad():
        ours = loaded.model(x, camids=cams)
        want = transreid_features(state, x, cams, heads=12, stride=12)
    assert _cosine_min(ours, want) >= 0.9999
    torch.testing.assert_close(ours, want, atol=2e-4, rtol=1e-4)
    with torch.no_grad():  # the camera matters: another camera gives another feature
        assert _cosine_min(loaded.model(x, camids=(cams + 1) % 6), want) < 0.9999


def test_format_reads_geometry_and_lists_every_unused_tensor(tmp_path):
    state = transreid_file(64, 3, classes=9, patches=210, cams=3, seed=2)
    conv = CHECKPOINT_FORMATS.get("transreid")().convert({"state_dict": state}, tmp_path / "f.pth")
    ignored = [i.split(" ")[0] for i in conv.ignored]
    # The base's 1000-class fc, and with JPM its last block and norm that TransReID never runs.
    assert sorted(ignored) == sorted(k for k in state if k.startswith(("base.fc.", "base.blocks.2.", "base.norm.")))
    assert len(conv.state) + len(ignored) == len(state)
    assert conv.state["backbone.b2.0.mlp.fc1.weight"] is state["b2.0.mlp.fc1.weight"]
    assert conv.state["backbone.sie_embed"] is state["base.sie_embed"]
    assert conv.state["classifier_4.weight"] is state["classifier_4.weight"]
    assert conv.num_classes == 9 and conv.defaults["MODEL.TRANSREID.CAMERA_NUM"] == 3
    assert conv.overrides["MODEL.TRANSREID.DIVIDE_LENGTH"] == 4
    # A tensor of no TransReID part: one error naming it.
    with pytest.raises(CheckpointError, match="extra_token"):
        CHECKPOINT_FORMATS.get("transreid")().convert({**state, "extra_token": torch.zeros(1)}, tmp_path / "f.pth")


@pytest.mark.parametrize("dim,depth,hidden,bias,patches,name,heads,size,stride", [
    (768, 12, 3072, True, 210, "vit_base_patch16_224", 12, [256, 128], 12),
    (768, 8, 2304, False, 128, "vit_small_patch16_224", 8, [256, 128], 16),
    (384, 12, 1536, True, 441, "deit_small_patch16_224", 6, [256, 256], 12),
    (768, 12, 3072, True, 242, "vit_base_patch16_224", 12, [256, 128], 11),
    (768, 12, 3072, True, 310, "vit_base_patch16_224", 12, [384, 128], 12),
])
def test_published_shapes_are_recognised(tmp_path, dim, depth, hidden, bias, patches, name, heads, size, stride):
    with torch.device("meta"):  # shapes only: nothing is allocated
        state = transreid_file(dim, depth, 751, patches, jpm=False, hidden=hidden, qkv_bias=bias)
    conv = CHECKPOINT_FORMATS.get("transreid")().convert(state, tmp_path / "f.pth")
    o = conv.overrides
    assert o["MODEL.NAME"] == "transreid:" + name and o["MODEL.TRANSREID.NUM_HEADS"] == heads
    assert o["INPUT.SIZE_TEST"] == size and o["MODEL.TRANSREID.STRIDE_SIZE"] == [stride, stride]
    assert o["MODEL.TRANSREID.JPM"] is False and "MODEL.TRANSREID.NUM_HEADS" not in conv.warnings


def test_unknown_patch_count_is_one_clear_error(tmp_path):
    state = transreid_file(64, 2, 5, patches=99, jpm=False)
    with pytest.raises(CheckpointError, match="99 patch positions"):
        CHECKPOINT_FORMATS.get("transreid")().convert(state, tmp_path / "f.pth")


def test_vit_small_without_jpm_neck_after_matches(tmp_path):
    # vit_small: no qkv bias, MLP ratio 3, attention scaled by 768^-0.5; here 2 blocks at 256x128
    # stride 16, no SIE, tested after the BNNeck.
    state = transreid_file(768, 2, classes=7, patches=128, jpm=False, hidden=2304, qkv_bias=False, seed=3)
    path = tmp_path / "vit_small.pth"
    torch.save(state, path)
    loaded = load_inference_model(load_config(None, [*CPU, "TEST.NECK_FEAT", "after"]), path)
    assert loaded.cfg.MODEL.NAME == "transreid:vit_small_patch16_224" and not loaded.model.takes_camids
    x = torch.randn(4, 3, 256, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = transreid_features(state, x, None, heads=8, stride=16, neck_feat="after", qk_scale=768 ** -0.5)
        torch.testing.assert_close(loaded.model(x), want, atol=1e-4, rtol=1e-4)


# -- training output, config ------------------------------------------------------------------

def _tiny_cfg(*extra: str):
    return load_config(None, [*CPU, "MODEL.NAME", "transreid:vit_base_patch16_224", "MODEL.HEAD", "transreid",
                              "INPUT.SIZE_TRAIN", "[64,32]", "INPUT.SIZE_TEST", "[64,32]",
                              "MODEL.TRANSREID.EMBED_DIM", "32", "MODEL.TRANSREID.DEPTH", "2",
                              "MODEL.TRANSREID.NUM_HEADS", "2", "MODEL.TRANSREID.STRIDE_SIZE", "[8,8]", *extra])


def test_training_output_weights_branches_as_transreid():
    cfg = _tiny_cfg("MODEL.TRANSREID.JPM", "True", "MODEL.TRANSREID.SIE_CAMERA", "True",
                    "MODEL.TRANSREID.CAMERA_NUM", "3", "MODEL.IF_LABELSMOOTH", "off")
    model = build_model(cfg, 5).train()
    out = model(torch.randn(8, 3, 64, 32), camids=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    assert isinstance(out.logits, Branches) and out.logits.weights == (0.5, 0.125, 0.125, 0.125, 0.125)
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    from strongreid.losses import build_loss
    terms = build_loss(cfg, 5, model.feat_dim)(out, targets)
    ce = [F.cross_entropy(t, targets) for t in out.logits]
    # TransReID's ID loss: 0.5 * global + 0.5 * mean over the local branches.
    torch.testing.assert_close(terms["id"], 0.5 * ce[0] + 0.5 * sum(ce[1:]) / 4)
    assert out.class_scores() is out.logits[0]
    with pytest.raises(Exception, match="outside the 3 cameras"):
        model.eval()(torch.randn(2, 3, 64, 32), camids=torch.tensor([0, 3]))


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match="CAMERA_NUM"):
        _tiny_cfg("MODEL.TRANSREID.SIE_CAMERA", "True")
    with pytest.raises(ConfigError, match="INPUT.SIZE_TEST"):
        _tiny_cfg("INPUT.SIZE_TEST", "[32,16]")
    with pytest.raises(ConfigError, match="MODEL.HEAD 'transreid'"):
        load_config(None, [*CPU, "MODEL.NAME", "transreid:vit_base_patch16_224"])
    with pytest.raises(ConfigError, match="TransReID transformer"):
        load_config(None, [*CPU, "MODEL.HEAD", "transreid"])


@pytest.mark.parametrize("preset", ["transreid.yml", "transreid_base.yml", "transreid_demo.yml"])
def test_presets_load_and_build(preset):
    cfg = load_config(str(ROOT / "configs" / preset), ["MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.HEAD == "transreid"
    if preset == "transreid.yml":
        t = cfg.MODEL.TRANSREID
        assert t.JPM and t.SIE_CAMERA and t.CAMERA_NUM == 6 and t.SIE_COE == 3.0
        assert list(t.STRIDE_SIZE) == [12, 12] and cfg.SOLVER.BASE_LR == 0.008
        assert cfg.SOLVER.OPTIMIZER_NAME == "SGD" and cfg.SOLVER.MAX_EPOCHS == 120
    if preset == "transreid_base.yml":
        assert not cfg.MODEL.TRANSREID.JPM and not cfg.MODEL.TRANSREID.SIE_CAMERA
    if preset == "transreid_demo.yml":
        assert build_model(load_config(str(ROOT / "configs" / preset), CPU), 4).feat_dim > 0


def test_imagenet_vit_file_seeds_both_jpm_branches(tmp_path):
    # A timm ViT file (224x224: 14 x 14 positions, a 1000-class head) into the stride-8 64x32
    # transformer: positions resized as TransReID resizes them, the last block into b1 and b2.
    vit = {k.removeprefix("base."): v for k, v in transreid_file(32, 2, 3, 196, jpm=False).items()
           if k.startswith("base.") and not k.startswith("base.fc.")}
    vit["head.weight"] = torch.zeros(1000, 32)
    torch.save(vit, tmp_path / "vit.pth")
    cfg = _tiny_cfg("MODEL.TRANSREID.JPM", "True", "MODEL.PRETRAIN_CHOICE", "imagenet",
                    "MODEL.PRETRAIN_PATH", str(tmp_path / "vit.pth"))
    model = build_model(cfg, 3)
    bb = model.backbone
    torch.testing.assert_close(bb.b1[0].attn.qkv.weight, vit["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(bb.b2[1].weight, vit["norm.weight"])
    grid = vit["pos_embed"][0, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    cells = F.interpolate(grid, size=(7, 3), mode="bilinear", align_corners=False)
    torch.testing.assert_close(bb.pos_embed[0, 1:], cells.permute(0, 2, 3, 1).reshape(21, 32))


def test_training_run_with_sie_jpm_and_center_loss(tiny_synthetic_root, tmp_path):
    # The tiny options train with center loss: it sees each branch's 32-d feature.
    out = tmp_path / "run"
    opts = tiny_train_opts(tiny_synthetic_root, out, **{
        "MODEL.NAME": "transreid:vit_base_patch16_224", "MODEL.HEAD": "transreid",
        "MODEL.TRANSREID.EMBED_DIM": 32, "MODEL.TRANSREID.DEPTH": 2, "MODEL.TRANSREID.NUM_HEADS": 2,
        "MODEL.TRANSREID.STRIDE_SIZE": "[8, 8]", "MODEL.TRANSREID.JPM": True,
        "MODEL.TRANSREID.SIE_CAMERA": True, "MODEL.TRANSREID.CAMERA_NUM": 3, "SOLVER.MAX_EPOCHS": 1,
        "SOLVER.EVAL_PERIOD": 1, "SOLVER.CHECKPOINT_PERIOD": 1})
    assert main(["train", *opts]) == 0
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["mAP"] <= 1
    extractor = FeatureExtractor(None, out / "best.pt", device="cpu")
    assert extractor.feat_dim == 5 * 32 and extractor.model.takes_camids


# -- the whole path: test, extract, FeatureExtractor, gallery, BoxMOT ----------------------------

@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> tuple[Path, dict]:
    state = transreid_file(64, 3, classes=751, patches=210, cams=3, seed=4)
    path = tmp_path_factory.mktemp("transreid") / "market_transreid.pth"
    torch.save(state, path)
    return path, state


def _pixels(images: list[np.ndarray]) -> torch.Tensor:
    """TransReID's test transform by hand on 256x128 uint8 images: ToTensor, Normalize 0.5."""
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in images])
    return (x - MEAN) / MEAN


def test_extractor_and_extract_pass_the_camera(small_file, tmp_path):
    path, state = small_file
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (256, 128, 3), dtype=np.uint8) for _ in range(4)]
    extractor = FeatureExtractor(load_config(None, CPU), path, device="cpu")
    assert extractor.checkpoint_format == "transreid"

    def want(cams):
        return F.normalize(transreid_features(state, _pixels(images), torch.tensor(cams), heads=1, stride=12), dim=1)

    torch.testing.assert_close(extractor(images, camids=[0, 1, 2, 1]), want([0, 1, 2, 1]), atol=1e-5, rtol=1e-4)
    # Without camera ids: MODEL.TRANSREID.TEST_CAMERA (0), as the exported graph.
    torch.testing.assert_close(extractor(images), want([0, 0, 0, 0]), atol=1e-5, rtol=1e-4)
    other = FeatureExtractor(load_config(None, [*CPU, "MODEL.TRANSREID.TEST_CAMERA", "2"]), path, device="cpu")
    torch.testing.assert_close(other(images), want([2, 2, 2, 2]), atol=1e-5, rtol=1e-4)

    # `extract` reads the camera off Market-style names (c2 -> 1), -1 (TEST_CAMERA) elsewhere.
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = ["0001_c2s1_000001_00.png", "0001_c3s1_000002_00.png", "0002_c1s1_000003_00.png", "x.png"]
    for name, a in zip(names, images):
        Image.fromarray(a).save(folder / name)
    out = tmp_path / "f.npz"
    assert main(["extract", "--images", str(folder), "--out", str(out), *CPU, "TEST.WEIGHT", str(path)]) == 0
    got = np.load(out)
    order = [names.index(Path(p).name) for p in got["paths"]]
    expect = want([1, 2, 0, 0]).numpy()[order]
    np.testing.assert_allclose(got["feats"], expect, atol=1e-5)
    assert list(got["camids"]) == [[1, 2, 0, -1][i] for i in order]

    # `strongreid test`'s feature loop hands the loader's camera ids to the model.
    loader = [(_pixels(images), torch.zeros(4), torch.tensor([2, 1, 0, 2]), ["a"] * 4)]
    feats, _, _, _ = extract_features(extractor.model, loader, torch.device("cpu"))
    torch.testing.assert_close(F.normalize(feats, dim=1), want([2, 1, 0, 2]), atol=1e-5, rtol=1e-4)


def test_strongreid_test_and_search_gallery(small_file, tiny_synthetic_root, tmp_path):
    path, _ = small_file
    out = tmp_path / "test"
    assert main(["test", *tiny_train_opts(tiny_synthetic_root, out, **{"TEST.WEIGHT": path})]) == 0
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["mAP"] <= 1 and results["num_query"] > 0
    assert "TransReID" in (out / "log.txt").read_text()

    from strongreid.search.ingest import ingest
    from strongreid.search.store import open_store

    crops = tmp_path / "crops"
    crops.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (200, 90, 3), dtype=np.uint8)).save(crops / f"{i:04d}_c1s1_{i:06d}_01.png")
    extractor = FeatureExtractor(load_config(None, CPU), path, device="cpu")
    store = open_store(str(tmp_path / "gallery.db"))
    try:
        stats = ingest(store, extractor, tmp_path / "thumbs", crops=[str(crops)], progress=False)
        assert stats.added == 3 and store.dim == extractor.feat_dim == 5 * 64
        query = extractor([Image.open(crops / "0001_c1s1_000001_01.png")]).numpy()
        hit = store.search(query, 1)[0][0]
        assert hit.score == pytest.approx(1.0, abs=1e-5)
    finally:
        store.close()


def test_boxmot_export_parity_and_sidecar(small_file, tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from strongreid.deploy import boxmot

    path, _ = small_file
    out = tmp_path / "transreid.onnx"
    assert main(["export", "--target", "boxmot", "--no-preprocessing-check", "--out", str(out),
                 *CPU, "TEST.WEIGHT", str(path)]) == 0
    sidecar = json.loads((tmp_path / "transreid.onnx.metadata.json").read_text())
    assert sidecar["model_kwargs"] == {"img_size": [256, 128]}
    assert "SIE camera 0" in caplog.text
    # BoxMOT's input (ImageNet-normalised crops) through the graph = the extractor's features.
    extractor = FeatureExtractor(load_config(None, CPU), path, device="cpu")
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 255, (256, 128, 3), dtype=np.uint8) for _ in range(3)]
    pixels = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in images])
    mi, si = (torch.tensor(v).view(1, 3, 1, 1) for v in (boxmot.BOXMOT_PIXEL_MEAN, boxmot.BOXMOT_PIXEL_STD))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ((pixels - mi) / si).numpy()})[0]
    assert np.abs(got - extractor(images).numpy()).max() <= 1e-4
    assert math.isclose(float(np.linalg.norm(got[0])), 1.0, rel_tol=1e-5)
